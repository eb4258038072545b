"""Loss-landscape geometry of a trained model: Hessian top eigenvalues, filter-normalised loss slices,
sharpness, and two input-sensitivity bounds (a layerwise Lipschitz product and the Jacobian norm).

`loss_fn(model) -> scalar tensor` computes the loss on a FIXED data subset that the caller chose (it
closes over the batch). Every number here is a function of that subset, so the caller records which
subset (sample ids or seed) next to the result. Loss evaluations run with the model in eval mode (no
dropout noise, no BatchNorm running-stat updates); the caller's per-module modes and the parameters are
restored exactly afterwards, also when `loss_fn` raises. Parameters are chosen as in
`microscope.sensitivity`: by name, default every parameter that requires grad, in sorted order.
Randomness comes from a `torch.Generator` seeded by `seed`, so results are deterministic per seed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    LossFn = Callable[[torch.nn.Module], torch.Tensor]

SHARPNESS_LABEL = "diagnostic: compare checkpoints of one run or a model with its variants, not different models"


def _select(model: torch.nn.Module, params: Sequence[str] | None) -> dict[str, torch.nn.Parameter]:
    named = dict(model.named_parameters())
    if params is None:
        names = sorted(n for n, p in named.items() if p.requires_grad)
    else:
        names = list(params)
        unknown = [n for n in names if n not in named or not named[n].requires_grad]
        if unknown:
            raise ValueError(f"params {unknown} are not parameters requiring grad; pick from model.named_parameters()")
    if not names:
        raise ValueError("no parameters selected; pass params=[...] names of parameters that require grad")
    return {n: named[n] for n in names}


def _scalar(loss: Any) -> torch.Tensor:
    import torch

    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor; reduce the batch loss with .mean()")
    return loss.reshape(())


@contextmanager
def _evaluating(model: torch.nn.Module, chosen: dict[str, torch.nn.Parameter]) -> Iterator[dict[str, torch.Tensor]]:
    """Eval mode plus a snapshot of `chosen`, restored bit for bit on exit (copying the saved values
    back is exact where undoing θ + αd by subtraction is not)."""
    import torch

    modes = {m: m.training for m in model.modules()}
    saved = {n: p.detach().clone() for n, p in chosen.items()}
    model.eval()
    try:
        yield saved
    finally:
        with torch.no_grad():
            for n, p in chosen.items():
                p.copy_(saved[n])
        for m, mode in modes.items():
            m.training = mode


def _place(
    chosen: dict[str, torch.nn.Parameter], theta: dict[str, torch.Tensor], moves: list[tuple[float, Any]]
) -> None:
    """Set each chosen parameter to θ + Σ scale·d[name] (d missing a name leaves it at θ)."""
    import torch

    with torch.no_grad():
        for n, p in chosen.items():
            value = theta[n].clone()
            for scale, d in moves:
                if n in d:
                    value.add_(d[n].to(value), alpha=scale)
            p.copy_(value)


def _blocks(v: torch.Tensor, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    parts = v.split([p.numel() for p in leaves])
    return [b.reshape(p.shape).to(p.dtype) for b, p in zip(parts, leaves, strict=True)]


def _hvp(model: torch.nn.Module, loss_fn: LossFn, leaves: list[torch.Tensor], like: torch.Tensor) -> Callable:
    """v ↦ Hv by double backprop through one retained first-order graph."""
    import torch

    with torch.enable_grad():
        grads = torch.autograd.grad(_scalar(loss_fn(model)), leaves, create_graph=True, allow_unused=True)
    # Blocks the loss does not reach, or reaches linearly, have zero Hessian rows.
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        vs = _blocks(v, leaves)
        out = [torch.zeros_like(p) for p in leaves]
        if used:
            hvs = torch.autograd.grad(
                [grads[i] for i in used],
                [leaves[i] for i in used],
                grad_outputs=[vs[i] for i in used],
                retain_graph=True,
                materialize_grads=True,
            )
            for i, h in zip(used, hvs, strict=True):
                out[i] = h
        return torch.cat([t.reshape(-1).to(like) for t in out])

    return hvp


def _deflate(v: torch.Tensor, found: list[torch.Tensor]) -> torch.Tensor:
    for u in found:  # Gram–Schmidt: the found eigenvectors are orthonormal
        v = v - (u @ v) * u
    return v


def _power(
    hvp: Callable, v: torch.Tensor, found: list[torch.Tensor], iters: int, tol: float, shift: float
) -> tuple[float, torch.Tensor, int, bool]:
    """Power iteration on (H − shift·I) restricted to found⊥; returns the Rayleigh quotient of H."""
    v = _deflate(v, found)
    v = v / v.norm()
    lam = math.nan
    for it in range(1, iters + 1):
        hv = hvp(v)
        new = float(v @ hv)
        w = _deflate(hv - shift * v, found)
        done = abs(new - lam) <= tol * max(abs(lam), 1e-12)
        lam = new
        norm = float(w.norm())
        if norm == 0.0 or done:  # norm 0: v is an exact eigenvector (eigenvalue `shift`)
            return lam, v if norm == 0.0 else w / norm, it, True
        v = w / norm
    return lam, v, iters, False


def hessian_top_eigen(
    model: torch.nn.Module,
    loss_fn: LossFn,
    k: int = 3,
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    params: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Top-k (largest algebraic) eigenvalues of the loss Hessian w.r.t. `params` by power iteration with
    deflation. Plain power iteration finds the eigenvalue of largest magnitude; when that is negative the
    search is rerun on H − λ·I, whose dominant eigenvalue is the largest algebraic one. Convergence: the
    Rayleigh quotient changes by at most `tol` (relative) between iterations. `composition` is the top
    eigenvector's share of squared norm per parameter tensor (sums to 1): which layers the sharpest
    direction lives in."""
    import torch

    if k < 1 or iters < 1 or not tol > 0:
        raise ValueError("need k >= 1, iters >= 1 and tol > 0; e.g. k=3, iters=100, tol=1e-4")
    chosen = _select(model, params)
    leaves = list(chosen.values())
    n = sum(p.numel() for p in leaves)
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} selected parameters; lower k")
    dtype = functools.reduce(torch.promote_types, [p.dtype for p in leaves])
    like = torch.empty(0, dtype=dtype, device=leaves[0].device)
    gen = torch.Generator().manual_seed(seed)
    found: list[torch.Tensor] = []
    runs = []
    with _evaluating(model, chosen):
        hvp = _hvp(model, loss_fn, leaves, like)
        for _ in range(k):
            start = torch.randn(n, generator=gen, dtype=torch.float64).to(like)
            lam, v, its, ok = _power(hvp, start, found, iters, tol, 0.0)
            if lam < 0:  # that was the most negative eigenvalue; on H − λI the largest algebraic dominates
                lam, v, more, ok = _power(hvp, start, found, iters, tol, lam)
                its += more
            found.append(v)
            runs.append((lam, its, ok, v))
    runs.sort(key=lambda r: -r[0])  # deflation finds them in order up to noise
    shares = [float(b.sum()) for b in runs[0][3].double().pow(2).split([p.numel() for p in leaves])]
    return {
        "eigenvalues": [r[0] for r in runs],
        "iterations": [r[1] for r in runs],
        "converged": [r[2] for r in runs],
        "composition": {name: share / sum(shares) for name, share in zip(chosen, shares, strict=True)},
    }


def random_direction(model: torch.nn.Module, seed: int, params: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Filter-normalised Gaussian direction (Li et al. 2018, "Visualizing the Loss Landscape of Neural
    Nets"): for each filter (slice along dim 0 of a tensor with ndim >= 2) the direction is rescaled to
    the filter's weight norm, so a slice does not depend on the arbitrary per-filter scale that BatchNorm
    or a following layer can absorb. Biases and 1-D (norm) parameters get zero direction, as in the paper."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in _select(model, params).items():
        w = p.detach()
        if w.ndim < 2:
            out[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w)
        scale = w.flatten(1).norm(dim=1) / (d.flatten(1).norm(dim=1) + 1e-10)
        out[name] = d * scale.reshape(-1, *([1] * (w.ndim - 1)))
    return out


def _direction_params(model: torch.nn.Module, *directions: dict[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    named = dict(model.named_parameters())
    for d in directions:
        for n, t in d.items():
            if n not in named or tuple(t.shape) != tuple(named[n].shape):
                raise ValueError(f"direction[{n!r}] matches no parameter of that shape; use random_direction")
    names = sorted({n for d in directions for n in d})
    if not names:
        raise ValueError("empty direction; build one with random_direction(model, seed)")
    return {n: named[n] for n in names}


def loss_slice_1d(
    model: torch.nn.Module, loss_fn: LossFn, direction: dict[str, torch.Tensor], alphas: Sequence[float]
) -> list[float]:
    """Loss at θ + α·d for each α."""
    return [row[0] for row in loss_slice_2d(model, loss_fn, direction, {}, alphas, [0.0])]


def loss_slice_2d(
    model: torch.nn.Module,
    loss_fn: LossFn,
    d1: dict[str, torch.Tensor],
    d2: dict[str, torch.Tensor],
    alphas: Sequence[float],
    betas: Sequence[float],
) -> list[list[float]]:
    """Loss at θ + α·d1 + β·d2: row i is alphas[i], column j is betas[j]."""
    import torch

    chosen = _direction_params(model, d1, d2)
    out = []
    with _evaluating(model, chosen) as theta, torch.no_grad():
        for a in alphas:
            row = []
            for b in betas:
                _place(chosen, theta, [(float(a), d1), (float(b), d2)])
                row.append(float(_scalar(loss_fn(model))))
            out.append(row)
    return out


def _loss_grad(model: torch.nn.Module, loss_fn: LossFn, chosen: dict[str, torch.nn.Parameter]) -> tuple[float, dict]:
    import torch

    with torch.enable_grad():
        loss = _scalar(loss_fn(model))
        grads = torch.autograd.grad(loss, list(chosen.values()), materialize_grads=True)
    return float(loss.detach()), dict(zip(chosen, grads, strict=True))


def _box_ascent(at: Callable, theta: dict[str, torch.Tensor], eps: float, steps: int, seed: int) -> float:
    """Largest loss seen by projected sign-gradient ascent in the box |δ| <= eps·(|θ| + 1); `at(δ)`
    places θ + δ and returns (loss, gradient)."""
    import torch

    radius = {n: eps * (t.abs() + 1) for n, t in theta.items()}
    gen = torch.Generator().manual_seed(seed)
    delta = {}
    for n, t in theta.items():
        delta[n] = (torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t) * 2 - 1) * radius[n]
    worst = -math.inf
    for _ in range(steps):
        loss, grad = at(delta)
        worst = max(worst, loss)
        stepped = {n: delta[n] + 2.5 / steps * radius[n] * grad[n].sign() for n in delta}
        delta = {n: torch.minimum(torch.maximum(stepped[n], -radius[n]), radius[n]) for n in delta}
    return max(worst, at(delta)[0])


def sharpness(
    model: torch.nn.Module,
    loss_fn: LossFn,
    eps: float = 1e-3,
    rho: float = 0.05,
    adaptive: bool = False,
    steps: int = 10,
    seed: int = 0,
    params: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Two flatness diagnostics at θ:
    - eps_sharpness (Keskar et al. 2017): 100·(max L − L)/(1 + L), the max over the L∞ box
      |δ| <= eps·(|θ| + 1) found by projected sign-gradient ascent from a seeded random point in the box
      (`steps` gradient steps of 2.5·radius/steps, Madry et al.'s PGD schedule); never negative since θ
      itself is a candidate.
    - rho_sharpness (Foret et al. 2021, SAM): L(θ + ρ·g/‖g‖) − L(θ); with adaptive=True ASAM (Kwon et
      al. 2021): perturbation ρ·T²g/‖Tg‖ with T = |θ|, which is invariant to per-weight rescaling."""
    import torch

    if not eps > 0 or not rho > 0 or steps < 1:
        raise ValueError("need eps > 0, rho > 0 and steps >= 1; e.g. eps=1e-3, rho=0.05, steps=10")
    chosen = _select(model, params)
    with _evaluating(model, chosen) as theta:
        base, g = _loss_grad(model, loss_fn, chosen)

        def at(delta: dict[str, torch.Tensor]) -> tuple[float, dict]:
            _place(chosen, theta, [(1.0, delta)])
            return _loss_grad(model, loss_fn, chosen)

        worst = max(base, _box_ascent(at, theta, eps, steps, seed))
        # ρ-sharpness: one normalised ascent step (ASAM scales it by T = |θ| twice, the norm once).
        scaled = {n: theta[n].abs() * g[n] for n in g} if adaptive else g
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in scaled.values()))
        rho_sharp = 0.0
        if norm > 0:
            step = {n: (theta[n].abs() * scaled[n] if adaptive else g[n]) * (rho / norm) for n in g}
            _place(chosen, theta, [(1.0, step)])
            with torch.no_grad():
                rho_sharp = float(_scalar(loss_fn(model))) - base
    eps_sharp = 100.0 * (worst - base) / (1.0 + base)
    out = {"loss": base, "eps_sharpness": eps_sharp, "rho_sharpness": rho_sharp, "eps": eps, "rho": rho}
    return {**out, "adaptive": adaptive, "steps": steps, "label": SHARPNESS_LABEL}


def lipschitz_upper_bound(model: torch.nn.Module) -> float:
    """Product of the spectral norms of every Linear and Conv1d/2d/3d weight. An upper bound on the
    network's Lipschitz constant only for a plain chain of these layers with 1-Lipschitz activations
    (ReLU, tanh); it ignores normalisation, residual and attention blocks. For a conv the weight is
    reshaped to [out, in·k·k] and that matrix's spectral norm used: a heuristic, not a tight (or even
    guaranteed) bound on the convolution operator's norm, which also depends on stride and padding."""
    import torch

    norms = [
        float(torch.linalg.matrix_norm(m.weight.detach().double().reshape(m.weight.shape[0], -1), ord=2))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d)
    ]
    if not norms:
        raise ValueError("model has no Linear or Conv layers; lipschitz_upper_bound needs at least one")
    return math.prod(norms)


def jacobian_norm(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean over the samples of x ([n, ...]) of ‖∂f(x_i)/∂x_i‖_F, the input–output Jacobian of one
    sample (torch.func.jacrev, vmapped over the batch; eval mode so samples do not interact)."""
    import torch
    from torch.func import jacrev, vmap

    if not isinstance(x, torch.Tensor) or x.ndim < 2 or len(x) == 0:
        raise ValueError("x must be a non-empty batch tensor [n, ...]; add a leading dimension with x.unsqueeze(0)")

    def one(xi: torch.Tensor) -> torch.Tensor:
        return model(xi.unsqueeze(0)).squeeze(0)

    with _evaluating(model, {}):
        jac = vmap(jacrev(one))(x)  # [n, *out, *in]
    return float(jac.detach().double().flatten(1).norm(dim=1).mean())
