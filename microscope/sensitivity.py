"""Curvature and sensitivity of the loss with respect to each parameter block.

- Gradient norm per block and the empirical Fisher diagonal: the mean over samples of the squared
  per-sample gradient (computed with torch.func: vmap over grad, no per-sample loop).
- Hutchinson's estimate of the Hessian trace per block: E[vᵀHv] over Rademacher v, via Hessian-vector
  products (double backward), reported with its standard error over probes.

The loss is the caller's: next-token CE for causal LMs, CE for classifiers, a documented proxy for
encoders. `loss_fn(params, batch)` must be a pure function of the parameter dict (torch.func style).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

LossFn = Callable[[dict[str, torch.Tensor], Any], torch.Tensor]


def fisher_diagonal(loss_fn: LossFn, params: dict[str, torch.Tensor], samples: Any) -> dict[str, torch.Tensor]:
    """Mean over samples of (∂ℓ_i/∂θ)²: `samples` is a batch whose leading dimension indexes samples;
    `loss_fn` receives one sample with a leading dimension of 1."""
    from torch.func import grad, vmap

    def one(p: dict[str, torch.Tensor], sample: Any) -> dict[str, torch.Tensor]:
        return grad(loss_fn)(p, _unsqueeze(sample))

    per_sample = vmap(one, in_dims=(None, 0))(params, samples)  # each [n, *shape]
    return {k: g.pow(2).mean(0) for k, g in per_sample.items()}


def _unsqueeze(sample: Any) -> Any:
    if isinstance(sample, tuple):
        return tuple(s.unsqueeze(0) for s in sample)
    return sample.unsqueeze(0)


def gradient_norms(loss_fn: LossFn, params: dict[str, torch.Tensor], batch: Any) -> dict[str, float]:
    from torch.func import grad

    return {k: float(g.norm()) for k, g in grad(loss_fn)(params, batch).items()}


def hutchinson_trace(
    loss_fn: LossFn, params: dict[str, torch.Tensor], batch: Any, probes: int, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Per block: (trace estimate, standard error) of its diagonal Hessian block, from `probes`
    Rademacher vectors drawn for all blocks at once."""
    names = sorted(params)
    leaves = [params[n].detach().clone().requires_grad_(True) for n in names]
    loss = loss_fn(dict(zip(names, leaves, strict=True)), batch)
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    # Blocks the loss does not reach (a pooler under a proxy loss) have zero curvature.
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(probes):
        vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in leaves]
        hvs = torch.autograd.grad(
            [grads[i] for i in used],
            [leaves[i] for i in used],
            grad_outputs=[vs[i] for i in used],
            retain_graph=True,
            allow_unused=True,
        )
        by_index = dict(zip(used, hvs, strict=True))
        for i, n in enumerate(names):
            hv = by_index.get(i)
            samples[n].append(0.0 if hv is None else float((vs[i] * hv).sum()))  # vᵀ H_bb v (cross terms average out)
    out = {}
    for n, vals in samples.items():
        t = torch.tensor(vals, dtype=torch.float64)
        se = float(t.std(unbiased=True) / len(vals) ** 0.5) if len(vals) > 1 else float("nan")
        out[n] = (float(t.mean()), se)
    return out
