"""Out-of-distribution sets: the user's (`reliability.ood_dataset`), or shifted sets made from the audit's own
data, each named in the record so a reader knows what "OOD" meant.

Images: the same images rotated a quarter turn and inverted (digits that are no longer digits), and
uniform noise. Text: the same windows with their tokens shuffled (the words, not the language), and
Python's own source code tokenized the same way (another language that ships with Python).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from microscope.errors import InputError

PYTHON_SOURCES = ("json/decoder.py", "textwrap.py", "argparse.py", "inspect.py", "dataclasses.py")


def shifted_images(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 7])
    return {
        "rotated-inverted": (1.0 - np.rot90(x, k=1, axes=(2, 3))).astype(x.dtype),
        "uniform-noise": rng.uniform(0.0, 1.0, size=x.shape).astype(x.dtype),
    }


def shifted_windows(windows: np.ndarray, seed: int, tokenizer: Any | None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 7])
    out = {"shuffled-tokens": np.stack([rng.permutation(w) for w in windows]) if len(windows) else windows}
    if tokenizer is not None:
        out["python-source"] = _python_source(tokenizer, windows.shape[1], len(windows))
    return out


def _python_source(tokenizer: Any, seq_len: int, n: int) -> np.ndarray:
    """Windows of Python's standard library source, as many as the in-distribution set has (or fewer)."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in PYTHON_SOURCES:
        path = lib / name
        if path.exists():
            ids += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) >= seq_len * n:
            break
    k = min(n, len(ids) // seq_len)
    return np.asarray(ids[: k * seq_len], dtype=np.int64).reshape(k, seq_len)


def user_ood(path: str, modality: str, like: np.ndarray, tokenizer: Any | None) -> dict[str, np.ndarray]:
    """`reliability.ood_dataset` read as the ingest stage reads datasets: images for an image classifier (the
    same shape), text windows of the audit's length for a text model."""
    from microscope import images

    if not Path(path).exists():
        raise InputError(f"reliability.ood_dataset {path} does not exist; point it at a dataset file or drop it")
    is_images = images.is_image_dataset(path)
    if modality == "images":
        if not is_images:
            raise InputError(
                f"reliability.ood_dataset {path} is not an image dataset but the audit's model is an image "
                "classifier; give an image dataset of the same shape (.npz with x, y)"
            )
        x, _ = images.read_images(path)
        if x.shape[1:] != like.shape[1:]:
            raise InputError(
                f"reliability.ood_dataset {path} has images of shape {list(x.shape[1:])}, the audit's are "
                f"{list(like.shape[1:])}; resize them to the model's input"
            )
        return {Path(path).name: x.astype(like.dtype)}
    if is_images:
        raise InputError(
            f"reliability.ood_dataset {path} is an image dataset but the audit's model reads text; give a text file"
        )
    if tokenizer is None:
        raise InputError("reliability.ood_dataset needs the model's tokenizer to read text; set model.tokenizer")
    text = Path(path).read_text(encoding="utf-8")
    seq_len = like.shape[1]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    k = min(len(like), len(ids) // seq_len)
    if k == 0:
        raise InputError(
            f"reliability.ood_dataset {path} has {len(ids)} tokens, fewer than one window of {seq_len}; give more text"
        )
    return {Path(path).name: np.asarray(ids[: k * seq_len], dtype=np.int64).reshape(k, seq_len)}
