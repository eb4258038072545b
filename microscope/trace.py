"""Trace activations at chosen (layer, hook) points into Parquet, in one forward pass per batch.

Hooks are keyed by module path and registered in sorted order; the forward stops right after the last
traced block, so no compute is spent past it. Each (layer, hook) is a Parquet dataset of part files;
a part is written under a temp name and renamed when whole, so a killed trace resumes at the first
part missing from any dataset.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from schemas.activations import STATS_METADATA_KEY, activation_schema
from schemas.config import TraceConfig
from schemas.hooks import hook_name
from schemas.records import HookPoints

from microscope.errors import InputError, is_oom
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

MAX_PENDING = 2  # batches queued for the writer thread
Progress = Callable[[int, int], None]


def resolve_layers(layers: list[int] | str, n_layers: int) -> list[int]:
    if layers == "all":
        return list(range(n_layers))
    out = []
    for layer in layers:
        idx = layer + n_layers if layer < 0 else layer
        if not 0 <= idx < n_layers:
            raise InputError(
                f"trace.layers: layer {layer} does not exist; the model has {n_layers} layers (0..{n_layers - 1})"
            )
        out.append(idx)
    if len(set(out)) != len(out):
        raise InputError(f"trace.layers {layers} names a layer twice (negative and positive); list each once")
    return sorted(out)


def resolve_points(
    points: list[HookPoints], layers: list[int], hooks: list[str], family: str
) -> dict[tuple[int, str], str]:
    """(layer, hook) -> module path."""
    out = {}
    for layer in layers:
        for hook in hooks:
            path = getattr(points[layer], hook)
            if path is None:
                raise InputError(f"trace.hooks: '{hook}' has no hook point in {family} blocks; allowed: resid")
            out[(layer, hook)] = path
    return out


@dataclass
class _Stats:
    """Running per-(layer, hook) statistics, mergeable across parts."""

    rows: int = 0
    norm_sum: float = 0.0
    norm_sq_sum: float = 0.0
    max_norm: float = 0.0
    near_zero: int = 0
    entries: int = 0

    def update(self, acts: np.ndarray, eps: float) -> None:
        norms = np.sqrt(np.einsum("ij,ij->i", acts, acts, dtype=np.float64))  # float64: no overflow or drift
        self.rows += acts.shape[0]
        self.norm_sum += float(norms.sum(dtype=np.float64))
        self.norm_sq_sum += float(np.square(norms, dtype=np.float64).sum())
        self.max_norm = max(self.max_norm, float(norms.max(initial=0.0)))
        self.near_zero += int(np.count_nonzero(np.abs(acts) < eps))
        self.entries += acts.size

    def merge(self, other: _Stats) -> None:
        self.rows += other.rows
        self.norm_sum += other.norm_sum
        self.norm_sq_sum += other.norm_sq_sum
        self.max_norm = max(self.max_norm, other.max_norm)
        self.near_zero += other.near_zero
        self.entries += other.entries

    def summary(self) -> dict[str, float]:
        mean = self.norm_sum / max(self.rows, 1)
        var = max(self.norm_sq_sum / max(self.rows, 1) - mean**2, 0.0)
        return {
            "tokens": float(self.rows),
            "mean_norm": mean,
            "std_norm": math.sqrt(var),
            "max_norm": self.max_norm,
            "near_zero_frac": self.near_zero / max(self.entries, 1),
        }


@dataclass
class _PartWriter:
    """One open part file of one (layer, hook) dataset, buffering rows into row groups."""

    store: ArtifactStore
    key: str
    d: int
    cfg: TraceConfig
    stats: _Stats = field(default_factory=_Stats)
    _buf: list[Any] = field(default_factory=list)
    _rows: int = 0
    _writer: Any = None
    _tmp: Any = None

    def write(
        self, window: np.ndarray, position: np.ndarray, doc: np.ndarray, token: np.ndarray, acts: np.ndarray
    ) -> None:
        import pyarrow as pa

        self.stats.update(acts, self.cfg.near_zero)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), self.d)  # zero-copy view
        cols = [pa.array(window), pa.array(position), pa.array(doc), pa.array(token), vec]
        self._buf.append(pa.RecordBatch.from_arrays(cols, schema=activation_schema(self.d)))
        self._rows += acts.shape[0]
        if self._rows >= self.cfg.row_group_tokens:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buf:
            return
        if self._writer is None:
            self._tmp = self.store.staging_path(self.key)
            self._writer = pq.ParquetWriter(
                self._tmp,
                activation_schema(self.d),
                compression=self.cfg.compression,
                use_dictionary=False,  # dictionaries of float vectors only cost time
                write_statistics=["window", "position", "doc_id", "token_id"],
            )
        self._writer.write_table(pa.Table.from_batches(self._buf), row_group_size=self._rows)
        self._buf, self._rows = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.add_key_value_metadata({STATS_METADATA_KEY: json.dumps(self.stats.__dict__)})
        self._writer.close()
        self.store.put_file(self.key, self._tmp, move=True)  # the part appears whole or not at all


@dataclass
class TraceResult:
    datasets: dict[str, dict[str, Any]]  # hook name -> {layer, hook, module, d, rows, parts, stats}
    windows: int
    resumed_from_window: int
    final_batch_size: int
    oom_halvings: int


class _StopForward(Exception):
    """Raised from the last traced block's hook: nothing after it needs computing."""


def _forward(model: nn.Module, ids: torch.Tensor) -> None:
    config = getattr(model, "config", None)
    if config is not None:  # HF models take keyword arguments; no KV cache is wanted
        kwargs: dict[str, Any] = {"input_ids": ids}
        if getattr(config, "use_cache", None) is not None:
            kwargs["use_cache"] = False
        model(**kwargs)
    else:
        model(ids)


def trace_to_parquet(
    model: nn.Module,
    input_ids: np.ndarray,
    doc_ids: np.ndarray,
    points: dict[tuple[int, str], str],
    blocks: dict[int, str],
    cfg: TraceConfig,
    store: ArtifactStore,
    prefix: str,
    progress: Progress | None = None,
) -> TraceResult:
    """Run the model over `input_ids` [n_windows, seq_len] and stream every (layer, hook) to Parquet
    under `prefix/{hook_name}/part-*.parquet`. `blocks` maps layer -> block module path."""
    import torch

    n_windows, seq_len = input_ids.shape
    device = next(model.parameters()).device
    part_windows = max(1, cfg.part_tokens // seq_len)
    n_parts = math.ceil(n_windows / part_windows)
    names = {lh: hook_name(*lh) for lh in points}
    modules = dict(model.named_modules())
    d_of: dict[tuple[int, str], int] = {}

    # Resume: the first part index missing from any dataset.
    done_parts = 0
    while done_parts < n_parts and all(
        store.exists(f"{prefix}/{names[lh]}/part-{done_parts:05d}.parquet") for lh in points
    ):
        done_parts += 1
    stats = {lh: _Stats() for lh in points}
    for lh in points:
        for k in range(done_parts):
            part_stats, d = _read_part_meta(store, f"{prefix}/{names[lh]}/part-{k:05d}.parquet")
            stats[lh].merge(part_stats)
            d_of[lh] = d

    captured: dict[tuple[int, str], torch.Tensor] = {}
    last_layer = max(layer for layer, _ in points)

    def make_hook(lh: tuple[int, str] | None, stop: bool) -> Callable[..., None]:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if lh is not None:
                t = out[0] if isinstance(out, tuple) else out
                captured[lh] = t.detach().to("cpu", torch.float32, copy=True)  # [batch, seq, d]
            if stop:
                raise _StopForward

        return hook

    bs, halvings = cfg.batch_size, 0
    handles = []
    # Parquet encoding and statistics run on one writer thread while the next batch goes through the
    # model; at most MAX_PENDING batches wait, which bounds memory.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-writer")
    pending: deque[Future[None]] = deque()

    def drain(keep: int) -> None:
        while len(pending) > keep:
            pending.popleft().result()  # re-raises a writer error here, in the caller's thread

    try:
        # Sorted so hook order is deterministic; the stopper is registered last on the last block.
        for lh in sorted(points):
            handles.append(modules[points[lh]].register_forward_hook(make_hook(lh, False)))
        handles.append(modules[blocks[last_layer]].register_forward_hook(make_hook(None, True)))

        positions = np.arange(seq_len, dtype=np.int32)
        for part in range(done_parts, n_parts):
            lo, hi = part * part_windows, min((part + 1) * part_windows, n_windows)
            writers: dict[tuple[int, str], _PartWriter] = {}
            w = lo
            while w < hi:
                n = min(bs, hi - w)
                batch = torch.from_numpy(input_ids[w : w + n].astype(np.int64)).to(device)
                captured.clear()
                try:
                    with torch.inference_mode():
                        _forward(model, batch)
                except _StopForward:
                    pass
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    captured.clear()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    if bs == 1:
                        raise InputError(
                            "out of memory at trace batch size 1; lower dataset.seq_len or trace fewer layers"
                        ) from None
                    bs, halvings = max(1, bs // 2), halvings + 1
                    continue
                missing = [lh for lh in points if lh not in captured]
                if missing:
                    raise RuntimeError(f"hooks did not fire for {missing}; the model's forward skipped them")
                rows = n * seq_len
                win = np.repeat(np.arange(w, w + n, dtype=np.int32), seq_len)
                pos = np.tile(positions, n)
                doc = doc_ids[w : w + n].reshape(-1)
                tok = input_ids[w : w + n].reshape(-1)
                jobs = []
                for lh in sorted(points):
                    acts = captured[lh].reshape(rows, -1).cpu().numpy()  # [n*seq, d]
                    if lh not in writers:
                        d_of[lh] = acts.shape[1]
                        key = f"{prefix}/{names[lh]}/part-{part:05d}.parquet"
                        writers[lh] = _PartWriter(store, key, acts.shape[1], cfg)
                    jobs.append((writers[lh], acts))
                pending.append(pool.submit(_write_all, jobs, win, pos, doc, tok))
                drain(MAX_PENDING)
                w += n
                if progress:
                    progress(w, n_windows)
            drain(0)
            for lh, wr in writers.items():
                wr.close()
                stats[lh].merge(wr.stats)
    finally:
        for h in handles:
            h.remove()
        pool.shutdown(wait=True, cancel_futures=True)

    datasets = {}
    for lh in sorted(points):
        layer, hook = lh
        datasets[names[lh]] = {
            "layer": layer,
            "hook": hook,
            "module": points[lh],
            "d": d_of.get(lh),
            "rows": stats[lh].rows,
            "parts": [f"{prefix}/{names[lh]}/part-{k:05d}.parquet" for k in range(n_parts)],
            "stats": stats[lh].summary(),
        }
    return TraceResult(datasets, n_windows, min(done_parts * part_windows, n_windows), bs, halvings)


def _write_all(jobs: list[tuple[_PartWriter, np.ndarray]], *columns: np.ndarray) -> None:
    for writer, acts in jobs:
        writer.write(*columns, acts)


def _read_part_meta(store: ArtifactStore, key: str) -> tuple[_Stats, int]:
    import pyarrow.parquet as pq

    meta = pq.read_metadata(store.local_path(key))
    raw = (meta.metadata or {}).get(STATS_METADATA_KEY)
    if raw is None:
        raise RuntimeError(f"part {key} has no statistics metadata; delete it and re-run the trace")
    return _Stats(**json.loads(raw)), meta.schema.to_arrow_schema().field("activation").type.list_size


@contextmanager
def capture(model: nn.Module, points: dict[tuple[int, str], str]) -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """Hooks that keep each point's output of the next forward in a dict; removed on exit."""
    out: dict[tuple[int, str], Any] = {}
    modules = dict(model.named_modules())

    def make(lh: tuple[int, str]) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, o: Any) -> None:
            out[lh] = (o[0] if isinstance(o, tuple) else o).detach()

        return hook

    handles = [modules[points[lh]].register_forward_hook(make(lh)) for lh in sorted(points)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def read_activations(store: ArtifactStore, parts: list[str], columns: list[str] | None = None) -> Any:
    """All rows of one (layer, hook) dataset as an Arrow table (small datasets and tests)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(store.local_path(k), columns=columns) for k in parts])


def activation_matrix(table: Any) -> np.ndarray:
    """[rows, d] float32 view of the activation column."""
    col = table.column("activation").combine_chunks()
    return np.asarray(col.flatten()).reshape(len(col), col.type.list_size)
