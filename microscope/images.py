"""Image datasets for classifiers: an .npz with `x` (N×C×H×W floats in [0, 1]) and `y` (N labels)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from microscope.errors import InputError

if TYPE_CHECKING:
    from schemas.records import StageRecord

    from microscope.store import ArtifactStore


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


def load_images(record: StageRecord, store: ArtifactStore) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels ingest copied into the store (its `images_key`)."""
    import io

    with np.load(io.BytesIO(store.get_bytes(record.details["images_key"])), allow_pickle=False) as f:
        return f["x"], f["y"]


def images_digest(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (x, y):
        h.update(str((a.dtype, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def check_fits(model: Any, x: np.ndarray, y: np.ndarray, path: str | Path) -> int:
    """The model must take x's images and have a class for every label: checked with one forward of the first
    image, so a mismatch is refused at ingest rather than as a torch error stages later. Returns the classes."""
    import torch

    try:
        with torch.inference_mode():
            out = model(torch.from_numpy(x[:1]).to(_dtype(model)))
    except (RuntimeError, ValueError, IndexError) as exc:  # what conv, linear and view raise for a wrong shape
        raise InputError(_shape_mismatch(model, x, path, exc)) from None
    logits = getattr(out, "logits", out)  # HF classifiers answer an output object
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 1:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(
            f"{path}: the model answers one image with {got}, not [1, classes] logits; audit an image classifier"
        )
    classes = int(logits.shape[1])
    if int(y.max()) >= classes:
        raise InputError(
            f"{path}: y holds label {int(y.max())} but the model has {classes} classes (labels 0-{classes - 1}); "
            "fix the labels or pass the model they belong to"
        )
    return classes


def _shape_mismatch(model: Any, x: np.ndarray, path: str | Path, exc: Exception) -> str:
    """One line: x's shape, what the model takes where that can be told (the channels of its first convolution,
    confirmed by a forward; the inputs of an MLP's first layer), else torch's own complaint (its first line)."""
    from torch import nn

    c, h, w = x.shape[1:]
    shape = f"(N={len(x)}, {c}, {h}, {w})"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[0].in_channels != c and _runs(model, (convs[0].in_channels, h, w)):
        want = convs[0].in_channels
        return (
            f"{path}: x has shape {shape} but the model takes ({want}, {h}, {w}) images; "
            f"give x shape (N, {want}, {h}, {w})"
        )
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not convs and linears and linears[0].in_features != c * h * w:
        return (
            f"{path}: x has shape {shape}, {c * h * w} values per image, but the model's first layer takes "
            f"{linears[0].in_features}; give x the shape the model was trained on"
        )
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"{path}: x has shape {shape} but the model cannot run {c}×{h}×{w} images ({reason}); "
        "give x the channels and H×W the model was trained on"
    )


def _runs(model: Any, shape: tuple[int, int, int]) -> bool:
    """Whether the model runs one all-zero image of `shape` (C, H, W)."""
    import torch

    try:
        with torch.inference_mode():
            model(torch.zeros((1, *shape), dtype=_dtype(model)))
    except (RuntimeError, ValueError, IndexError):
        return False
    return True


def _dtype(model: Any) -> Any:
    """The dtype the model computes in (that of its first floating-point parameter): images go in at it."""
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
