"""Our white-box sweeps: PGD with random restarts and FGSM (Linf), and Gaussian-noise injection; every
curve starts with clean accuracy and is evaluated on the same samples and seeds for every variant.

A sample broken at ε stays broken at every larger ε (the adversarial input found at ε lies inside the
larger ball too), so the robust-accuracy curves are non-increasing by construction, as the true robust
accuracy is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Model = Callable[[torch.Tensor], torch.Tensor]


def _grad(model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g


def _correct(model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(-1) == y


def pgd(
    model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, restarts: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linf PGD (Madry et al.): uniform random start, step 2.5·ε/steps, projection onto the ε-ball ∩ box.
    Returns (still correct after every restart, an adversarial input per sample: the first that broke
    it, else the last iterate)."""
    gen = torch.Generator().manual_seed(seed)
    robust = _correct(model, x, y)
    adv = x.clone()
    if eps == 0:
        return robust, adv
    alpha = 2.5 * eps / steps
    for _ in range(restarts):
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x) * eps
        xa = (x + delta).clamp(0, 1)
        for _ in range(steps):
            xa = xa + alpha * _grad(model, xa, y).sign()
            xa = torch.min(torch.max(xa, x - eps), x + eps).clamp(0, 1)
        broken = robust & ~_correct(model, xa, y)
        adv[broken] = xa[broken]
        adv[robust & ~broken] = xa[robust & ~broken]
        robust &= ~broken
    return robust, adv


def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Correct after one signed-gradient step of size ε."""
    if eps == 0:
        return _correct(model, x, y)
    return _correct(model, (x + eps * _grad(model, x, y).sign()).clamp(0, 1), y)


def noise(model: Model, x: torch.Tensor, y: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return _correct(model, (x + sigma * torch.randn(x.shape, generator=gen).to(x)).clamp(0, 1), y)


def _frac(flags: torch.Tensor) -> float:
    return int(flags.sum()) / len(flags)


def sweep(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: list[float],
    steps: int,
    restarts: int,
    seed: int,
    batch_size: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[float]], torch.Tensor | None]:
    """Accuracy curves over ε: clean first (ε = 0 of every curve), then PGD, FGSM and noise per ε.
    Returns the curves and the PGD adversarial inputs at the largest ε (for the feature shifts)."""
    n = len(x)
    clean = torch.cat([_correct(model, x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)])
    pgd_ok, fgsm_ok = clean.clone(), clean.clone()
    curves: dict[str, list[float]] = {"eps": [], "pgd": [], "fgsm": [], "noise": []}
    last_adv = None
    for j, eps in enumerate(eps_list):
        rob, fg, nz, adv = [], [], [], []
        for i in range(0, n, batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            r, a = pgd(model, xb, yb, eps, steps, restarts, seed + i)
            rob.append(r)
            adv.append(a)
            fg.append(fgsm(model, xb, yb, eps))
            nz.append(noise(model, xb, yb, eps, seed + i))
        pgd_ok &= torch.cat(rob)
        fgsm_ok &= torch.cat(fg)
        curves["eps"].append(eps)
        curves["pgd"].append(_frac(pgd_ok))
        curves["fgsm"].append(_frac(fgsm_ok))
        curves["noise"].append(_frac(torch.cat(nz)))
        last_adv = torch.cat(adv)
        if progress:
            progress(f"ε {eps:.4g}: PGD {curves['pgd'][-1]:.3f} ({j + 1}/{len(eps_list)})")
    curves["clean"] = [_frac(clean)]
    return curves, last_adv
