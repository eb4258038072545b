"""The 15 common corruptions of Hendrycks & Dietterich (ICLR 2019), plus occlusion, sized for small images.

Parameters follow the paper's CIFAR-10-C tables (make_cifar_c.py). Spatial ones (blur widths, motion lengths,
displacements, flake and patch sizes) are multiplied by `k = min(H, W) / 32`: the 8×8 scikit-learn digits are
32×32 bitmaps summed over 4×4 blocks, so k is their physical scale. Sub-pixel values must still act rather than
round to nothing, so blurs are applied as continuous transfer functions in the Fourier domain and warps sample
bilinearly. Where a CIFAR table is not monotone in severity it was made so (noted at each table).

Randomness comes from one generator per (seed, corruption), spawned from `seed`; every severity draws the same
numbers, so severity changes only the strength (a stronger corruption of the same noise, patch, fog, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS: tuple[str, ...] = tuple(name for names in FAMILIES.values() for name in names)
ALL: tuple[str, ...] = CORRUPTIONS + ("occlusion",)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

Rng = np.random.Generator
_LUMA = np.array([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)  # ITU-R 601, as OpenCV's RGB2GRAY


def _k(x: np.ndarray) -> float:
    return min(x.shape[-2:]) / 32.0


# --- shared operations -----------------------------------------------------------------------------------------


def _fourier(x: np.ndarray, transfer: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Convolve each image with the kernel whose transfer function is `transfer(fy, fx)` (broadcast against
    [n, C, 3H, 3W//2+1]). Mirror padding by a whole image keeps the FFT's wrap-around off the borders."""
    h, w = x.shape[-2:]
    padded = np.pad(x, ((0, 0), (0, 0), (h, h), (w, w)), mode="symmetric")
    fy, fx = np.fft.fftfreq(3 * h)[:, None], np.fft.rfftfreq(3 * w)[None, :]
    out = np.fft.irfft2(np.fft.rfft2(padded) * transfer(fy, fx), s=(3 * h, 3 * w))
    return out[..., h : 2 * h, w : 2 * w]


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    return _fourier(x, lambda fy, fx: np.exp(-2 * np.pi**2 * sigma**2 * (fy**2 + fx**2)))


def _motion(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's motion blur (the paper's, via Wand): a one-sided line of length `radius` with Gaussian
    weights of width `sigma`, at one angle (degrees) per image; taps at sub-pixel positions."""
    taps = np.linspace(0.0, radius, 16)
    weights = np.exp(-(taps**2) / (2 * sigma**2))
    weights /= weights.sum()
    theta = np.deg2rad(angles).reshape(-1, 1, 1, 1)

    def transfer(fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
        along = fx * np.cos(theta) - fy * np.sin(theta)  # frequency along the motion, y pointing down
        return sum(wt * np.exp(-2j * np.pi * t * along) for t, wt in zip(taps, weights, strict=True))

    return _fourier(x, transfer)


def _warp(x: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Sample x bilinearly at (yy, xx), each broadcastable to [n, 1, H, W], mirroring at the borders."""
    from scipy.ndimage import map_coordinates

    n, c, h, w = x.shape
    shape = (n, c, h, w)
    plane = np.broadcast_to(np.arange(n * c, dtype=np.float64).reshape(n, c, 1, 1), shape)
    coords = [np.broadcast_to(a, shape).reshape(n * c, h, w) for a in (plane, yy, xx)]
    return map_coordinates(x.reshape(n * c, h, w), coords, order=1, mode="reflect").reshape(shape)


def _zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre by `factor` (≥ 1), keeping the size (the paper's clipped_zoom)."""
    h, w = x.shape[-2:]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy = cy + (np.arange(h)[:, None] - cy) / factor
    xx = cx + (np.arange(w)[None, :] - cx) / factor
    return _warp(x, yy, xx)


def _plasma(rng: Rng, n: int, size: int, decay: float) -> np.ndarray:
    """The paper's diamond-square plasma fractal in [0, 1], n at once: [n, m, m], m the power of two ≥ size."""
    m = 1 << max(1, (size - 1).bit_length())
    a = np.zeros((n, m, m))
    step, wibble = m, 100.0
    while step >= 2:
        half = step // 2
        ul = a[:, ::step, ::step]
        sq = ul + np.roll(ul, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        a[:, half::step, half::step] = sq / 4 + wibble * rng.uniform(-wibble, wibble, sq.shape)
        dr = a[:, half::step, half::step]
        for rows, cols, axis in (
            (slice(None, None, step), slice(half, None, step), 1),
            (slice(half, None, step), slice(None, None, step), 2),
        ):
            s = dr + np.roll(dr, 1, axis=axis) + ul + np.roll(ul, -1, axis=3 - axis)
            a[:, rows, cols] = s / 4 + wibble * rng.uniform(-wibble, wibble, s.shape)
        step, wibble = half, wibble / decay
    a -= a.min(axis=(1, 2), keepdims=True)
    return a / a.max(axis=(1, 2), keepdims=True)


# --- noise -----------------------------------------------------------------------------------------------------


def _gaussian_noise(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    return x + rng.standard_normal(x.shape) * (0.04, 0.06, 0.08, 0.09, 0.10)[s]


def _shot_noise(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    photons = (500, 250, 100, 75, 50)[s]
    return rng.poisson(x * photons) / photons


def _impulse_noise(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    hit, salt = rng.random(x.shape), rng.random(x.shape) < 0.5  # salt and pepper in equal parts, per value
    return np.where(hit < (0.01, 0.02, 0.03, 0.05, 0.07)[s], salt.astype(np.float64), x)


# --- blur ------------------------------------------------------------------------------------------------------


def _defocus_blur(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    from scipy.special import j1

    # CIFAR's (disk radius, alias σ) was (.3,.4) (.4,.5) (.5,.6) (1,.2) (1.5,.1): its discrete disks round radii
    # < 1 to one pixel, so its effective widths are ~.4 .5 .6 .66 .82 px. A continuous disk needs monotone radii
    # for the same ladder (here ~.47 .55 .58 .66 .76 px).
    radius, alias = ((0.5, 0.4), (0.75, 0.4), (1.0, 0.3), (1.25, 0.2), (1.5, 0.1))[s]
    radius, alias = radius * _k(x), alias * _k(x)

    def transfer(fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
        rho = 2 * np.pi * radius * np.hypot(fy, fx)
        disk = np.where(rho > 1e-9, 2 * j1(rho) / np.maximum(rho, 1e-9), 1.0)  # Fourier transform of a disk
        return disk * np.exp(-2 * np.pi**2 * alias**2 * (fy**2 + fx**2))

    return _fourier(x, transfer)


def _glass_blur(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    # (σ, swap reach in pixels at 32 px, passes). CIFAR's (.05,1,1) (.25,1,1) (.4,1,1) (.25,1,2) (.4,1,2) grows σ
    # at a fixed swap, and the second blur then undoes more of the swapping: less change at higher severity on
    # smooth images. Here reach and passes grow with σ.
    sigma, reach, iterations = ((0.05, 0.4, 1), (0.25, 0.6, 1), (0.4, 0.8, 1), (0.4, 1, 2), (0.5, 1, 3))[s]
    x = _gaussian(x, sigma * _k(x))
    n, _, h, w = x.shape
    # Swaps are whole pixels: a reach below one pixel becomes one-pixel swaps made with probability reach, so the
    # expected displacement still scales with the image.
    reach = reach * _k(x)
    step = max(1, round(reach))
    shifts = rng.integers(-step, step + 1, size=(iterations, h, w, 2, n))
    shifts *= rng.random((iterations, h, w, 1, n)) < min(1.0, reach / step)
    idx = np.arange(n)
    for it in range(iterations):
        for i in range(h - 1 - step, step - 1, -1):  # the paper's order: bottom-right to top-left, in place
            for j in range(w - 1 - step, step - 1, -1):
                i2, j2 = i + shifts[it, i, j, 0], j + shifts[it, i, j, 1]
                here, there = x[idx, :, i, j], x[idx, :, i2, j2]
                x[idx, :, i, j], x[idx, :, i2, j2] = there, here
    return _gaussian(x, sigma * _k(x))


def _motion_blur(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    radius, sigma = ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3))[s]
    return _motion(x, radius * _k(x), sigma * _k(x), rng.uniform(-45, 45, size=len(x)))


def _zoom_blur(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    # Zoom factors are already relative to the image size, so they are not scaled.
    factors = np.arange(1, (1.06, 1.11, 1.16, 1.21, 1.26)[s], 0.01)
    return (x + sum(_zoom(x, float(f)) for f in factors)) / (len(factors) + 1)


# --- weather ---------------------------------------------------------------------------------------------------


def _snow(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, keep = (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    )[s]
    n, c, h, w = x.shape
    flakes = _zoom(loc + scale * rng.standard_normal((n, 1, h, w)), max(1.0, zoom * _k(x)))
    flakes = np.where(flakes < threshold, 0.0, flakes)
    flakes = _motion(flakes, radius * _k(x), sigma * _k(x), rng.uniform(-135, -45, size=n))
    gray = (x * _LUMA).sum(1, keepdims=True) if c == 3 else x
    x = keep * x + (1 - keep) * np.maximum(x, gray * 1.5 + 0.5)  # the paper's whitening of the scene
    return x + flakes + np.rot90(flakes, 2, axes=(-2, -1))


def _frost(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    # CIFAR's (1,.2) (1,.3) (.9,.4) (.85,.4) (.75,.45), with the frost weight raised at 4 and 5 so the change is
    # monotone: lowering only the image weight makes bright strokes change less, not more.
    keep, amount = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.45), (0.75, 0.5))[s]
    n, c, h, w = x.shape
    # No frost photographs ship with us: the level set of a rough plasma fractal gives thin, branching veins.
    veins = (1 - np.abs(2 * _plasma(rng, n, max(h, w), 1.6)[:, None, :h, :w] - 1)) ** 3
    veins = veins / veins.max(axis=(2, 3), keepdims=True)
    tint = np.array([0.85, 0.93, 1.0]).reshape(1, 3, 1, 1) if c == 3 else 1.0  # ice is bluish
    return keep * x + amount * veins * tint


def _fog(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    thickness, decay = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[s]
    n, _, h, w = x.shape
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    fog = _plasma(rng, n, max(h, w), decay)[:, None, :h, :w]
    return (x + thickness * fog) * peak / (peak + thickness)


def _brightness(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    lift = (0.05, 0.1, 0.15, 0.2, 0.3)[s]
    if x.shape[1] == 1:
        return x + lift
    # V += lift in HSV: with hue and saturation fixed, RGB is proportional to V (black becomes gray).
    v = x.max(axis=1, keepdims=True)
    v_new = np.clip(v + lift, 0, 1)
    return np.where(v > 0, x * v_new / np.maximum(v, 1e-12), v_new)


# --- digital ---------------------------------------------------------------------------------------------------


def _contrast(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    mean = x.mean(axis=(2, 3), keepdims=True)
    return (x - mean) * (0.75, 0.5, 0.4, 0.3, 0.15)[s] + mean


def _elastic_transform(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    # Fractions of the image size: (affine point jitter, elastic displacement s.d., its correlation length).
    # CIFAR trades affine (.08 → .03) against elastic (0 → ~.017) across severities, which is not monotone;
    # here both grow, spanning the same magnitudes.
    jitter, amp, corr = (
        (0.04, 0.004, 0.08),
        (0.05, 0.007, 0.07),
        (0.06, 0.01, 0.06),
        (0.07, 0.013, 0.05),
        (0.08, 0.016, 0.04),
    )[s]
    n, _, h, w = x.shape
    size = min(h, w)
    # The paper's random affine: three points around the centre move by up to jitter·size; we solve for the map
    # from moved to original points, which is where each output pixel samples.
    centre, d = np.array([h / 2, w / 2]), size // 3
    src = np.array([centre + d, [centre[0] + d, centre[1] - d], centre - d])
    dst = src + rng.uniform(-jitter * size, jitter * size, size=(n, 3, 2))
    affine = np.linalg.solve(np.concatenate([dst, np.ones((n, 3, 1))], axis=2), np.broadcast_to(src, (n, 3, 2)))
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), np.ones(1), indexing="ij"), axis=-1)[:, :, 0]
    coords = np.einsum("hwk,nkd->ndhw", grid, affine)  # [n, 2, h, w]
    field = _gaussian(rng.uniform(-1, 1, size=(n, 2, h, w)), corr * size)
    field *= amp * size / field.std(axis=(2, 3), keepdims=True)  # unit s.d. whatever the smoothing
    coords = coords + field
    return _warp(x, coords[:, None, 0], coords[:, None, 1])


def _area(src: int, dst: int) -> np.ndarray:
    """Box resampling from src to dst cells along one axis (Pillow's BOX): each output cell averages the input
    cells it overlaps, weighted by the overlap."""
    edges = np.arange(dst + 1) * src / dst
    cells = np.arange(src)
    overlap = np.clip(np.minimum(edges[1:, None], cells + 1) - np.maximum(edges[:-1, None], cells), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def _pixelate_matrix(size: int, factor: float) -> np.ndarray:
    """Box-downsample to size·factor cells and back, as one matrix. A fractional cell count blends the two
    neighbouring whole counts, so an 8-pixel side still has five distinct levels."""
    target = size * factor
    lo = max(1, int(np.floor(target)))
    frac = target - lo
    hi = min(lo + 1, size)
    return (1 - frac) * _area(lo, size) @ _area(size, lo) + frac * _area(hi, size) @ _area(size, hi)


def _pixelate(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    factor = (0.95, 0.9, 0.85, 0.75, 0.65)[s]
    rows, cols = (_pixelate_matrix(n, factor) for n in x.shape[-2:])
    return np.einsum("ij,ncjk,lk->ncil", rows, x, cols)


def _jpeg_compression(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    import io

    from PIL import Image

    quality = (80, 65, 58, 50, 40)[s]
    pixels = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)  # [n, H, W, C]
    out = np.empty(pixels.shape, dtype=np.float64)
    for i, img in enumerate(pixels):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buf), dtype=np.float64).reshape(img.shape) / 255
    return out.transpose(0, 3, 1, 2)


def _occlusion(x: np.ndarray, s: int, rng: Rng) -> np.ndarray:
    # Side 1/8 … 5/8 of the image: five distinct sides even at 8×8. The fill is each image's channel mean (Cutout's
    # zero after normalisation), so the patch hides content on a dark background too.
    frac = (0.125, 0.25, 0.375, 0.5, 0.625)[s]
    n, _, h, w = x.shape
    pos = rng.random((n, 2))
    masks = []
    for axis, length in enumerate((h, w)):
        side = max(1, round(frac * length))
        start = np.floor(pos[:, axis] * (length - side + 1))[:, None]
        masks.append((np.arange(length) >= start) & (np.arange(length) < start + side))  # [n, length]
    inside = (masks[0][:, :, None] & masks[1][:, None, :])[:, None]
    return np.where(inside, x.mean(axis=(2, 3), keepdims=True), x)


_FUNCS: dict[str, Callable[[np.ndarray, int, Rng], np.ndarray]] = {name: globals()[f"_{name}"] for name in ALL}


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corruption `name` at `severity` (1–5) of images x, float [n, C, H, W] in [0, 1] with C = 1 or 3; the same
    shape and dtype back, clipped to [0, 1]. Deterministic per seed; severities share their random draws."""
    if name not in _FUNCS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(ALL)}")
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(map(str, SEVERITIES))}, got {severity!r}")
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [n, C, H, W] with C = 1 or 3, got shape {x.shape}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(ALL.index(name),)))
    out = _FUNCS[name](x.astype(np.float64), int(severity) - 1, rng)
    return np.clip(out, 0, 1).astype(x.dtype)


# --- scoring ---------------------------------------------------------------------------------------------------


def _errors(acc: Mapping[Any, float]) -> dict[int, float]:
    return {int(sev): 1.0 - float(a) for sev, a in acc.items()}  # int(): JSON records key severities by string


def _ratio(num: float, den: float, name: str, what: str, undefined: dict[str, str], why: str) -> float | None:
    if den > 0:
        return 100.0 * num / den
    undefined[f"{name}.{what}"] = why
    return None


def corruption_summary(
    acc: Mapping[str, Mapping[int, float]],
    clean_acc: float,
    baseline: Mapping[str, Mapping[int, float]] | None = None,
    baseline_clean: float | None = None,
) -> dict[str, Any]:
    """The paper's figures from accuracies per corruption and severity (plain floats).

    `mean_corruption_accuracy` is the mean over every corruption and severity present, and `corruptions[c]` the
    accuracy of c averaged over its severities. With a baseline: CE_c = 100·Σ_s E(c,s) / Σ_s E_base(c,s) with
    E = 1 − accuracy over the severities both have, `mce` the mean CE over the 15 corruptions present (occlusion is
    reported but, as in the paper, not in mCE); relative CE_c = 100·Σ_s (E(c,s) − E_clean) / Σ_s (E_base(c,s) −
    E_base_clean) and `relative_mce` likewise (it needs `baseline_clean`). The baseline is any reference the
    caller chooses, the run's first checkpoint, the full-precision model or AlexNet's published errors; nothing
    here depends on which. A figure whose denominator is not positive (a baseline without error on a corruption,
    or no worse than clean) is None, with the reason under `undefined`, and an mCE over it is None too.
    """
    undefined: dict[str, str] = {}
    per: dict[str, dict[str, float | None]] = {}
    for name, sevs in acc.items():
        if sevs:
            per[name] = {"accuracy": float(np.mean([float(a) for a in sevs.values()]))}
    every = [float(a) for sevs in acc.values() for a in sevs.values()]
    out: dict[str, Any] = {
        "clean_accuracy": float(clean_acc),
        "mean_corruption_accuracy": float(np.mean(every)) if every else None,
        "corruptions": per,
    }
    if baseline is None:
        return out | {"undefined": undefined}
    clean_err = 1.0 - float(clean_acc)
    base_clean_err = None if baseline_clean is None else 1.0 - float(baseline_clean)
    for name, row in per.items():
        err, base = _errors(acc[name]), _errors(baseline.get(name, {}))
        sevs = sorted(set(err) & set(base))
        if not sevs:
            row["ce"] = row["relative_ce"] = None
            undefined[f"{name}.ce"] = undefined[f"{name}.relative_ce"] = "no severity in common with the baseline"
            continue
        num, den = sum(err[s] for s in sevs), sum(base[s] for s in sevs)
        row["ce"] = _ratio(num, den, name, "ce", undefined, "the baseline has no error on this corruption")
        if base_clean_err is None:
            row["relative_ce"] = None
            undefined[f"{name}.relative_ce"] = "no baseline clean accuracy given"
            continue
        num, den = num - len(sevs) * clean_err, den - len(sevs) * base_clean_err
        why = "the baseline's error under this corruption does not exceed its clean error"
        row["relative_ce"] = _ratio(num, den, name, "relative_ce", undefined, why)
    included = [name for name in CORRUPTIONS if name in per]
    for key, mean_key in (("ce", "mce"), ("relative_ce", "relative_mce")):
        values = [per[name][key] for name in included]
        missing = [name for name, v in zip(included, values, strict=True) if v is None]
        out[mean_key] = float(np.mean([v for v in values if v is not None])) if included and not missing else None
        if out[mean_key] is None:
            undefined[mean_key] = f"{key} undefined for: {', '.join(missing)}" if missing else "none of the 15 present"
    out["mce_corruptions"] = included
    return out | {"undefined": undefined}
