"""Image datasets for classifiers: an .npz with `x` (N×C×H×W floats in [0, 1]) and `y` (N labels)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

from microscope.errors import InputError


def is_image_dataset(path: str | None) -> bool:
    return bool(path) and str(path).lower().endswith(".npz")


def read_images(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """x as float32 [N, C, H, W] and y as int64 [N]; every problem a one-line InputError naming the fix."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"image dataset {p} does not exist; pass an .npz file with arrays x and y")
    try:
        with np.load(p, allow_pickle=False) as f:  # object arrays would need pickle: refused
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise InputError(f"{p} has no array '{missing[0]}'; save it with np.savez(path, x=images, y=labels)")
            x, y = f["x"], f["y"]
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"{p} is not a readable .npz of numeric arrays ({str(exc).splitlines()[0]})") from None
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(x) == 0:
        raise InputError(f"{p}: x has shape {x.shape}; expected N×C×H×W (or N×H×W) with N ≥ 1")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise InputError(f"{p}: x must be finite floats in [0, 1] (pixels / 255); rescale it")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise InputError(
            f"{p}: y must hold one non-negative integer label per image ({len(x)}); got {y.shape} {y.dtype}"
        )
    return x.astype(np.float32), y.astype(np.int64)


def images_digest(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (x, y):
        h.update(str((a.dtype, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
