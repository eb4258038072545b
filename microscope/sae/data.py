"""Activation batches for SAE training: a shuffle buffer over chunks, several epochs, resumable.

The trainer only sees an iterable of [batch, d_in] tensors; where chunks come from (Parquet row groups
of the activation cache, or an array in memory) is the `chunks` callable's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

Chunks = Callable[[], Iterator[np.ndarray]]  # each call yields the data once, in a fixed order


def parquet_chunks(paths: list[Path], windows: set[int] | None = None, exclude: bool = False) -> Chunks:
    """Row groups of an activation dataset as [rows, d] float32 arrays; optionally only (or all but) some
    windows, so training and held-out evaluation read disjoint tokens."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def gen() -> Iterator[np.ndarray]:
        for p in paths:
            f = pq.ParquetFile(p)
            for rg in range(f.num_row_groups):
                t = f.read_row_group(rg, columns=["window", "activation"])
                if windows is not None:
                    mask = pc.is_in(t.column("window"), value_set=pa.array(sorted(windows)))
                    t = t.filter(pc.invert(mask) if exclude else mask)
                if t.num_rows == 0:
                    continue
                col = t.column("activation").combine_chunks()
                yield np.asarray(col.flatten()).reshape(len(col), col.type.list_size)

    return gen


def array_chunks(x: np.ndarray, rows: int = 4096) -> Chunks:
    def gen() -> Iterator[np.ndarray]:
        for lo in range(0, len(x), rows):
            yield x[lo : lo + rows]

    return gen


class ShuffledBatches(IterableDataset):
    """Batches of `batch_size` rows: chunks fill a buffer of `buffer_rows`, rows are shuffled within it
    (seeded by epoch and buffer index), `epochs` passes. `start_batch()` tells where a resumed fit is.

    A chunk may be a tuple of row-aligned arrays (several hook points of the same tokens): every part
    gets the same permutation and batches are tuples, so several SAEs train from one pass."""

    def __init__(
        self,
        chunks: Chunks,
        batch_size: int,
        buffer_rows: int,
        epochs: int,
        seed: int,
        scale: float | tuple[float, ...] = 1.0,
        start_batch: Callable[[], int] = lambda: 0,
    ):
        self.chunks, self.batch_size, self.buffer_rows = chunks, batch_size, buffer_rows
        self.epochs, self.seed, self.scale, self.start_batch = epochs, seed, scale, start_batch

    def batches(self) -> Iterator[tuple[np.ndarray, ...]]:
        for epoch in range(self.epochs):
            buf: list[tuple[np.ndarray, ...]] = []
            n, k = 0, 0
            for chunk in self.chunks():
                parts = chunk if isinstance(chunk, tuple) else (chunk,)
                buf.append(parts)
                n += len(parts[0])
                if n >= self.buffer_rows:
                    yield from self._emit(buf, epoch, k)
                    buf, n, k = [], 0, k + 1
            if buf:
                yield from self._emit(buf, epoch, k)

    def _emit(self, buf: list[tuple[np.ndarray, ...]], epoch: int, k: int) -> Iterator[tuple[np.ndarray, ...]]:
        rows = [np.concatenate([b[j] for b in buf]) for j in range(len(buf[0]))]
        perm = np.random.default_rng([self.seed, epoch, k]).permutation(len(rows[0]))
        # Full batches only: a ragged tail batch would change the optimiser's step sizes.
        for lo in range(0, len(perm) - self.batch_size + 1, self.batch_size):
            sel = perm[lo : lo + self.batch_size]
            yield tuple(r[sel] for r in rows)

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, ...]]:
        skip = self.start_batch()
        for i, parts in enumerate(self.batches()):
            if i < skip:  # a resumed fit continues with the batch it would have seen next
                continue
            scales = self.scale if isinstance(self.scale, tuple) else (self.scale,) * len(parts)
            out = tuple(torch.from_numpy(p * s if s != 1.0 else p.copy()) for p, s in zip(parts, scales, strict=True))
            yield out if len(out) > 1 else out[0]

    def count(self) -> int:
        return sum(1 for _ in self.batches())


def joint_chunks(sources: list[Chunks]) -> Chunks:
    """Row-aligned chunks of several datasets of the same tokens (one per hook point), as tuples."""

    def gen() -> Iterator[tuple[np.ndarray, ...]]:
        for parts in zip(*(src() for src in sources), strict=True):
            if len({len(p) for p in parts}) != 1:
                raise ValueError(f"datasets are not row-aligned: chunk sizes {[len(p) for p in parts]}")
            yield tuple(parts)

    return gen


def activation_scale(sample: np.ndarray) -> float:
    """s with E‖s·x‖² = d_in (SAELens' expected_average_only_in normalisation)."""
    return float(np.sqrt(sample.shape[1] / np.mean(np.sum(sample.astype(np.float64) ** 2, axis=1))))


def geometric_median(x: np.ndarray, iters: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Weiszfeld's algorithm: the point minimising the summed distances (robust decoder-bias init)."""
    y = x.mean(0)
    for _ in range(iters):
        d = np.linalg.norm(x - y, axis=1).clip(1e-12)
        w = 1 / d
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if np.linalg.norm(y_new - y) < tol * max(1.0, np.linalg.norm(y)):
            return y_new
        y = y_new
    return y


def parquet_rows(paths: list[Path]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(activations [n, d], window [n], position [n]) per row group: for feature contexts."""
    import pyarrow.parquet as pq

    for p in paths:
        f = pq.ParquetFile(p)
        for rg in range(f.num_row_groups):
            t = f.read_row_group(rg, columns=["window", "position", "activation"])
            col = t.column("activation").combine_chunks()
            x = np.asarray(col.flatten()).reshape(len(col), col.type.list_size)
            yield x, np.asarray(t.column("window")), np.asarray(t.column("position"))
