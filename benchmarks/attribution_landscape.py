"""The attribution, landscape and pruning computations against their peers and floors, in one run.

    python benchmarks/attribution_landscape.py [--images 256] [--reps 3]

- Integrated Gradients (64 Gauss-Legendre points) and SmoothGrad (16 samples) of the digits CNN through
  `microscope.attribution` vs the same Captum calls made directly (our wrapper adds the input checks, the
  baseline's forward pass for the completeness figure and the NumPy copy): ratio ours / Captum.
- λmax by power iteration (`curvature.hessian_top_eigen`, k = 1) vs the dense Hessian (torch.func.hessian)
  and `numpy.linalg.eigvalsh` on an MLP of ~2,000 parameters (the exact reference; it grows as p², power
  iteration as p); and as a fraction of its floor: the gradient graph built once plus iterations × one
  backward through it (a Hessian-vector product).
- The 21 × 21 loss slice (`curvature.loss_slice_2d`) against its floor: 441 forward passes over the subset.
- Global 50 % magnitude pruning of a GPT-2-sized set of matrices (12 × 4 blocks of 768-wide weights):
  `pruning.magnitude_masks` + `apply_masks` vs torch.nn.utils.prune.global_unstructured (L1) + remove.
Prints best-of-reps times and ratios as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def best(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _digits(n: int) -> tuple[Any, Any, Any]:
    import torch
    from sklearn.datasets import load_digits

    from microscope.models.vision import DigitsCNN

    d = load_digits()
    x = torch.from_numpy((d.images[:n] / 16.0).astype(np.float32)[:, None])
    y = torch.from_numpy(d.target[:n])
    torch.manual_seed(0)
    return DigitsCNN().eval(), x, y


def attributions(n: int, reps: int) -> dict[str, Any]:
    import torch
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    from microscope import attribution as at

    model, x, y = _digits(n)
    ours_ig = best(lambda: at.integrated_gradients(model, x, y, steps=64), reps)
    peer_ig = best(
        lambda: IntegratedGradients(model).attribute(
            x.clone().requires_grad_(), baselines=torch.zeros_like(x), target=y, n_steps=64, method="gausslegendre"
        ),
        reps,
    )
    stdev = 0.15 * float(x.max() - x.min())
    ours_sg = best(lambda: at.smoothgrad(model, x, y, 0.15, 16), reps)
    peer_sg = best(
        lambda: NoiseTunnel(Saliency(model)).attribute(
            x.clone().requires_grad_(), nt_type="smoothgrad", nt_samples=16, stdevs=stdev, target=y
        ),
        reps,
    )
    return {
        "images": n,
        "integrated_gradients": {
            "ours_s": round(ours_ig, 4),
            "captum_s": round(peer_ig, 4),
            "ratio": round(ours_ig / peer_ig, 2),
        },
        "smoothgrad": {
            "ours_s": round(ours_sg, 4),
            "captum_s": round(peer_sg, 4),
            "ratio": round(ours_sg / peer_sg, 2),
        },
    }


def curvature(reps: int) -> dict[str, Any]:
    import torch
    from torch.func import functional_call, hessian

    from microscope import curvature as cv

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 10)).double()
    x, y = torch.randn(512, 32, dtype=torch.float64), torch.randint(0, 10, (512,))

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(x), y)

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def flat_loss(theta: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = int(np.prod(s))
            parts[n] = theta[i : i + k].view(s)
            i += k
        return torch.nn.functional.cross_entropy(functional_call(model, parts, (x,)), y)

    def dense() -> float:
        return float(np.linalg.eigvalsh(hessian(flat_loss)(flat0).numpy())[-1])

    result: dict[str, Any] = {}

    def power() -> None:
        result.update(cv.hessian_top_eigen(model, loss_fn, k=1, iters=200, tol=1e-6))

    ours, peer = best(power, reps), best(dense, reps)
    exact = dense()
    params = [p for p in model.parameters()]
    v = [torch.randn_like(p) for p in params]
    grads = torch.autograd.grad(loss_fn(model), params, create_graph=True)
    graph_s = best(lambda: torch.autograd.grad(loss_fn(model), params, create_graph=True), max(reps, 5))

    def one_hvp() -> None:  # the floor: one backward through the retained first-order graph
        torch.autograd.grad(grads, params, v, retain_graph=True)

    hvp_s = best(one_hvp, max(reps, 5))
    its = result["iterations"][0]
    return {
        "parameters": int(flat0.numel()),
        "lambda_max": {
            "power_iteration": result["eigenvalues"][0],
            "eigvalsh": exact,
            "relative_error": abs(result["eigenvalues"][0] - exact) / abs(exact),
            "ours_s": round(ours, 4),
            "dense_s": round(peer, 4),
            "ratio": round(ours / peer, 3),
            "iterations": its,
            "floor_s": round(graph_s + its * hvp_s, 4),
            "fraction_of_floor": round((graph_s + its * hvp_s) / ours, 2),
        },
    }


def slices(reps: int) -> dict[str, Any]:
    import torch

    from microscope import curvature as cv

    model, x, y = _digits(1000)

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(m(x), y)

    d1, d2 = cv.random_direction(model, 1), cv.random_direction(model, 2)
    grid = list(np.linspace(-1, 1, 21))
    ours = best(lambda: cv.loss_slice_2d(model, loss_fn, d1, d2, grid, grid), 1)
    with torch.no_grad():
        one = best(lambda: loss_fn(model), max(reps, 5))
    return {
        "images": 1000,
        "slice_2d_21x21": {
            "ours_s": round(ours, 3),
            "floor_s": round(441 * one, 3),
            "fraction_of_floor": round(441 * one / ours, 2),
        },
    }


def pruning(reps: int) -> dict[str, Any]:
    import copy

    import torch
    from torch.nn.utils import prune as tp

    from microscope import pruning as pr

    torch.manual_seed(0)
    blocks = [torch.nn.Linear(768, 768) for _ in range(48)]
    model = torch.nn.Sequential(*blocks)

    def ours() -> None:
        m = copy.deepcopy(model)
        pr.apply_masks(m, pr.magnitude_masks(m, 0.5, "global", exclude=set()))

    def peer() -> None:
        m = copy.deepcopy(model)
        pairs = [(mod, "weight") for mod in m]
        tp.global_unstructured(pairs, pruning_method=tp.L1Unstructured, amount=0.5)
        for mod, name in pairs:
            tp.remove(mod, name)

    copy_s = best(lambda: copy.deepcopy(model), reps)
    a, b = best(ours, reps), best(peer, reps)
    return {
        "weights": sum(m.weight.numel() for m in blocks),
        "magnitude_global_50": {
            "ours_s": round(a - copy_s, 3),
            "torch_prune_s": round(b - copy_s, 3),
            "ratio": round((a - copy_s) / (b - copy_s), 2),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    out = {
        "attribution": attributions(args.images, args.reps),
        "curvature": curvature(args.reps),
        "landscape": slices(args.reps),
        "pruning": pruning(args.reps),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
