"""Randomized-smoothing certificates (Cohen, Rosenfeld & Kolter, ICML 2019): their CERTIFY algorithm.

The smoothed classifier g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ²I), is robust in L2 around x: if the top
class has probability pA ≥ pA_lower > 1/2, then g is constant within radius σ·Φ⁻¹(pA_lower). CERTIFY picks the
top class ĉA from n0 noisy samples, then counts its wins nA in n fresh ones (selection and estimation on separate
draws, so the bound below stays valid) and takes pA_lower as the one-sided (1 − α) Clopper–Pearson lower bound;
it abstains when pA_lower < 1/2. With probability ≥ 1 − α per input, a returned certificate is correct.

Noise is added to the input unclipped, as in the paper: clipping to [0, 1] would make the noise non-Gaussian
and void the certificate.

Determinism: one torch.Generator on the model's device, seeded with `seed` per call, drawn in a fixed order
(input by input, the n0 draw then the n draw, in `batch_size` chunks). The same (seed, batch_size, device) gives
the same result; a different batch_size or device draws different noise (torch's normal sampler is
chunk- and device-specific), so the certificates differ within their statistical guarantee.

The model is run as given: the caller sets model.eval() (this module never changes its mode).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RADII = [0.0, 0.25, 0.5, 0.75, 1.0]
ABSTAIN = -1


def clopper_pearson_lower(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson lower bound on a binomial proportion with n_a successes of n."""
    from scipy.stats import beta

    # beta.ppf with a = 0 is NaN; the exact bound there is 0.
    return 0.0 if n_a == 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))


def certified_accuracy_curve(radius: list[float], correct: list[bool], radii: list[float]) -> dict[float, float]:
    """Fraction of ALL samples that are correct with certified radius ≥ r, for each r in `radii`.

    Radius 0 counts every correct, non-abstained sample (an abstention is never correct).
    """
    if len(radius) != len(correct) or not radius:
        raise ValueError(f"radius ({len(radius)}) and correct ({len(correct)}) must be equal, non-empty lists")
    rad, ok = np.asarray(radius, dtype=np.float64), np.asarray(correct, dtype=bool)
    return {float(r): float(np.mean(ok & (rad >= r))) for r in radii}


def _check(x: np.ndarray, y: np.ndarray, sigma: float, n0: int, n: int, alpha: float, batch_size: int) -> None:
    """Every problem is one line naming the fix."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite positive noise level, got {sigma!r}; use e.g. 0.25")
    for name, v in (("n0", n0), ("n", n), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}; use e.g. 100 (n0) or 1000 (n)")
    if not (0 < alpha < 0.5):
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha!r}; use e.g. 0.001 as in Cohen et al.")
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be float images [n, C, H, W], got {x.dtype} of shape {x.shape}; scale to [0, 1]")
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape}); pass at least one image")
    if not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise ValueError("x must be finite pixels in [0, 1]; divide by 255 (or the maximum) first")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"y must be 1-D integer class indices, got {y.dtype} of shape {y.shape}; cast with .astype(int)"
        )
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels; pass matching samples")
    if y.min() < 0:
        raise ValueError(f"y must be class indices >= 0, got minimum {y.min()}; remap labels to 0..classes-1")


def _counts(model: Any, image: Any, sigma: float, num: int, batch_size: int, gen: Any) -> np.ndarray:
    """Class counts of the model's argmax over `num` noisy copies of `image` (a [C, H, W] tensor)."""
    import torch

    counts = np.zeros(0, dtype=np.int64)
    with torch.no_grad():
        for start in range(0, num, batch_size):
            size = min(batch_size, num - start)
            noise = torch.randn((size, *image.shape), generator=gen, device=image.device, dtype=image.dtype)
            top = model(image.unsqueeze(0) + sigma * noise).argmax(1).cpu().numpy()
            c = np.bincount(top)
            counts = np.pad(counts, (0, max(0, c.size - counts.size)))
            counts[: c.size] += c
    return counts


def _device_dtype(model: Any) -> tuple[Any, Any]:
    import torch

    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    # a parameterless model (a fixed rule) runs on the CPU in float32
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def certify(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    sigma: float,
    n0: int = 100,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """CERTIFY (Cohen et al. 2019, Algorithm 1) for each image of `x` (float [n, C, H, W] in [0, 1]) with labels `y`.

    Per sample: `prediction` (-1 = abstain), `radius` (0.0 when abstained or wrong), `correct`, and the raw
    `n_a` (wins of the predicted class in n draws) and `p_a_lower`. The model must already be in eval() mode.
    """
    import torch
    from scipy.stats import norm

    x, y = np.asarray(x), np.asarray(y)
    _check(x, y, sigma, n0, n, alpha, batch_size)
    device, dtype = _device_dtype(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device, dtype)
    prediction, radius, correct, n_as, p_lows = [], [], [], [], []
    for image, label in zip(xt, y.tolist(), strict=True):
        c_hat = int(_counts(model, image, sigma, n0, batch_size, gen).argmax())
        counts = _counts(model, image, sigma, n, batch_size, gen)
        n_a = int(counts[c_hat]) if c_hat < counts.size else 0
        p_low = clopper_pearson_lower(n_a, n, alpha)
        pred = c_hat if p_low >= 0.5 else ABSTAIN
        ok = pred != ABSTAIN and pred == label
        prediction.append(pred)
        radius.append(float(sigma * norm.ppf(p_low)) if ok else 0.0)
        correct.append(ok)
        n_as.append(n_a)
        p_lows.append(p_low)
    with torch.no_grad():
        clean = [model(xt[i : i + batch_size]).argmax(1).cpu().numpy() for i in range(0, len(xt), batch_size)]
    return {
        "sigma": float(sigma),
        "n0": int(n0),
        "n": int(n),
        "alpha": float(alpha),
        "samples": len(y),
        "prediction": prediction,
        "radius": radius,
        "correct": correct,
        "n_a": n_as,
        "p_a_lower": p_lows,
        "abstained": prediction.count(ABSTAIN),
        "certified_accuracy": certified_accuracy_curve(radius, correct, RADII),
        "clean_accuracy": float(np.mean(np.concatenate(clean) == y)),
        "bound": f"Clopper-Pearson one-sided lower bound on pA at confidence 1 - alpha, alpha = {alpha:g}",
    }
