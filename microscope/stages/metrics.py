"""metrics: weight spectra and statistics of every matrix, anomaly flags, loss sensitivity (gradient
norms, Fisher diagonal, Hutchinson Hessian traces) and CKA between traced layers and variants."""

from __future__ import annotations

import io as _io
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from schemas.config import AuditConfig, canonical_hash
from schemas.details import MetricsDetails, MetricsShardDetails, metrics_shard_details
from schemas.records import Architecture, StageRecord

from microscope import figures
from microscope.cka import cka_matrix, linear_cka
from microscope.modality import open_data
from microscope.models import loading
from microscope.spectra import esd_histogram, matrix_stats, mp_spikes, power_law_fit
from microscope.stages.inputs import StageInputs
from microscope.stages.runner import StageRun, run_stage, stage_prefix
from microscope.store import ArtifactStore
from microscope.vectors import layer_embedding, standardise_layers

VERSION = "4"  # 4: weight statistics fan out to shard tasks; Fisher stored in full; CKA across audits
SHARD_VERSION = "1"
WEIGHT_KEYS = ("near_zero", "cond_floor", "exact_max_dim", "randomized_rank", "weight_shards")


def config_hash(cfg: AuditConfig, dataset_digest: str, traces: dict[str, str]) -> str:
    return canonical_hash(
        {
            "v": VERSION,
            "metrics": cfg.metrics.model_dump(),
            "dataset": dataset_digest,
            "traces": dict(sorted(traces.items())),
            "seed": cfg.seed,
        }
    )


def shard_hash(cfg: AuditConfig) -> str:
    """What the weight statistics depend on (besides the weights): a change elsewhere in `metrics`
    (flag thresholds, sensitivity, CKA) reuses the shards."""
    return canonical_hash({"v": SHARD_VERSION, **{k: getattr(cfg.metrics, k) for k in WEIGHT_KEYS}, "seed": cfg.seed})


def shard_plan(model: Any, shards: int) -> list[list[str]]:
    """Matrices split into `shards` groups of about equal cost (longest-processing-time first: cost of a
    spectrum ~ m·n·min(m, n)); every shard computes the same plan from the same model."""
    mats = [(n, t.shape) for n, t in loading.unique_state(model) if t.is_floating_point() and t.dim() >= 2]
    cost = {n: int(np.prod(sh)) * min(sh[0], int(np.prod(sh[1:]))) for n, sh in mats}
    plan: list[list[str]] = [[] for _ in range(max(1, min(shards, len(mats))))]
    load = [0] * len(plan)
    for n in sorted(cost, key=lambda k: (-cost[k], k)):
        i = int(np.argmin(load))
        plan[i].append(n)
        load[i] += cost[n]
    return plan


def _blocks_path(arch: Architecture) -> str:
    """'transformer.h' for GPT-2: the ModuleList the hook points live in."""
    return arch.hook_points[0].resid.rsplit(".", 1)[0] if arch.hook_points else ""


def layer_index(name: str, blocks: str) -> int:
    """Block index of a parameter name (-1 outside the blocks: embeddings, heads)."""
    m = re.match(re.escape(blocks) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def weight_table(
    model: Any, blocks: str, cfg: AuditConfig, names: list[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One row per 2-D weight (conv kernels reshaped; `names` restricts to a shard), its singular values
    and its raw layer embedding."""
    rows, spectra, vectors = [], {}, {}
    wanted = set(names) if names is not None else None
    for name, t in loading.unique_state(model):
        if not t.is_floating_point() or t.dim() < 2:  # biases and norms are not matrices
            continue
        if wanted is not None and name not in wanted:
            continue
        stats = matrix_stats(
            t.detach().float().numpy(),
            cfg.metrics.near_zero,
            cfg.metrics.cond_floor,
            exact_max_dim=cfg.metrics.exact_max_dim,
            rank=cfg.metrics.randomized_rank,
            seed=cfg.seed,
        )
        fit = power_law_fit(stats["singular_values"])
        sv = stats.pop("singular_values")
        spectra[name] = sv
        vectors[name] = layer_embedding({**stats, "singular_values": sv}, fit)
        rows.append(  # undefined figures (cond on the randomized path, α without a fit): None + reason
            figures.row(
                {
                    "name": name,
                    "layer": layer_index(name, blocks),
                    **stats,
                    **fit,
                    "mp_spikes": mp_spikes(sv, tuple(stats["shape"]), frobenius=stats["frobenius"]),
                    "esd": esd_histogram(sv),
                }
            )
        )
    return rows, spectra, vectors


_BLAS_LOCK = threading.Lock()
_BLAS_STATE: dict[str, Any] = {"users": 0, "limiter": None}


@contextmanager
def blas_threads(concurrent: int) -> Iterator[None]:
    """BLAS threads for one of `concurrent` shards running side by side in this process: their share of
    the cores. Spectra are LAPACK-bound; 2 shards × 2 BLAS threads on 2 cores run slower than 1 × 2,
    2 shards × 1 thread about 1.7× faster (benchmarks/spectra.py). The limit is process-wide, so the
    first shard in sets it and the last one out restores it (overlapping per-thread contexts would
    otherwise restore each other's value and leave the process at one thread)."""
    import os

    from threadpoolctl import threadpool_limits

    with _BLAS_LOCK:
        if _BLAS_STATE["users"] == 0:
            _BLAS_STATE["limiter"] = threadpool_limits(max(1, (os.cpu_count() or 1) // max(1, concurrent)))
        _BLAS_STATE["users"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE["users"] -= 1
            if _BLAS_STATE["users"] == 0:
                _BLAS_STATE["limiter"].restore_original_limits()
                _BLAS_STATE["limiter"] = None


def run_shard(inp: StageInputs, shard: int) -> StageRecord:
    """Weight statistics of one shard of the model's matrices (a task of its own, so shards can run on
    separate workers); cached by the weights' digest and the statistics' settings."""
    cfg, store = inp.cfg, inp.store
    n = cfg.metrics.weight_shards
    chash = shard_hash(cfg)
    prefix = stage_prefix(inp.model_digest, "metrics-weights", chash) + f"/shard-{shard}-of-{n}"

    def compute(run: StageRun) -> StageRecord:
        model = loading.load_model(inp.ref)
        plan = shard_plan(model, n)
        names = plan[shard] if shard < len(plan) else []
        with blas_threads(n):
            rows, spectra, vectors = weight_table(model, _blocks_path(inp.arch), cfg, names)
        return run.record(
            input_digests={"model": inp.model_digest},
            artifacts={
                "spectra": store.put_bytes(run.key("spectra.npz"), _npz(spectra)),
                "layer_vectors": store.put_bytes(run.key("layer_vectors.npz"), _npz(vectors)),
            },
            metrics={"matrices": float(len(rows))},
            details=MetricsShardDetails(
                prefix=run.prefix,
                weights=rows,
                spectra_key=run.key("spectra.npz"),
                vectors_key=run.key("layer_vectors.npz"),
            ),
        )

    return run_stage(store, "metrics", prefix, chash, compute, variant=f"shard-{shard}")


def flag(rows: list[dict[str, Any]], cfg: AuditConfig) -> None:
    """Adds `flags` (list of reasons) to each row."""
    lo, hi = cfg.metrics.alpha_range
    # Undefined on the randomized path (σmin unknown; None, or NaN in older rows): left out of the median
    # and never flagged
    log_cond = np.log10(
        [max(r["condition_number"], 1.0) if figures.is_number(r["condition_number"]) else np.nan for r in rows]
    )
    finite = log_cond[np.isfinite(log_cond)]
    med = float(np.median(finite)) if finite.size else 0.0
    mad = float(np.median(np.abs(finite - med))) if finite.size else 0.0
    mad = mad or 1e-12
    for r, lc in zip(rows, log_cond, strict=True):
        reasons = []
        if figures.is_number(r["alpha"]) and not lo <= r["alpha"] <= hi:
            reasons.append(f"alpha {r['alpha']:.2f} outside [{lo:g}, {hi:g}]")
        if r["effective_rank"] < cfg.metrics.erank_floor * min(r["shape"]):
            reasons.append(f"effective rank {r['effective_rank']:.1f} < {cfg.metrics.erank_floor:g}·{min(r['shape'])}")
        z = 0.6745 * (lc - med) / mad  # robust z-score of log10 condition number across the model
        if np.isfinite(z) and z > cfg.metrics.robust_z:
            reasons.append(f"condition number {r['condition_number']:.3g} (robust z {z:.1f})")
        r["flags"] = reasons


def sensitivity(
    model: Any, arch: Architecture, ids: np.ndarray, cfg: AuditConfig, labels: np.ndarray | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per parameter tensor: gradient norm, Fisher diagonal trace and max, Hutchinson trace ± s.e.
    Loss: next-token CE for causal LMs; CE for classifiers (`ids` are then images and `labels` their
    classes); for encoders a documented proxy, the mean squared final hidden state (its curvature
    measures how strongly each block moves the output representation).
    Also returns the Fisher diagonal itself, tensor by tensor, for storage and the report's heatmaps."""
    import torch

    from microscope.sensitivity import hutchinson_trace

    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # double backward through fused attention is not implemented
    params = {k: v.detach() for k, v in model.named_parameters()}
    device = next(model.parameters()).device
    loss_fn, ids = _loss_fn(model, arch, ids, labels, device)
    x = torch.from_numpy(ids.astype(np.int64)).to(device)
    fisher, grads_total = _empirical_fisher(loss_fn, params, x)
    hutch = hutchinson_trace(loss_fn, params, x, probes=cfg.metrics.hutchinson_probes, seed=cfg.seed)
    blocks = _blocks_path(arch)
    rows = [
        {
            "name": k,
            "layer": layer_index(k, blocks),
            "grad_norm": float(grads_total[k].norm()),
            "fisher_trace": float(fisher[k].sum()),
            "fisher_max": float(fisher[k].max()),
            "hessian_trace": hutch[k][0],
            "hessian_trace_se": hutch[k][1],
        }
        for k in sorted(params)
    ]
    return rows, {k: v.cpu() for k, v in fisher.items()}


def _loss_fn(
    model: Any, arch: Architecture, ids: np.ndarray, labels: np.ndarray | None, device: Any
) -> tuple[Callable[[dict[str, Any], Any], Any], np.ndarray]:
    """The loss of `sensitivity` as a function of (parameters, a batch of samples), and the samples it
    takes (for a classifier, indices into its images)."""
    import torch
    from torch.func import functional_call

    causal = arch.is_causal and arch.has_unembedding
    if labels is not None:  # a classifier: samples are indices into the images, so both loops can slice them
        images, targets = torch.from_numpy(ids).to(device), torch.from_numpy(labels).to(device)

        def loss_fn(p: dict[str, torch.Tensor], i: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(functional_call(model, p, (images[i],)), targets[i])

        ids = np.arange(len(images))
    elif causal:

        def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, p, (), {"input_ids": x, "labels": x, "use_cache": False}).loss
    else:

        def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, p, (), {"input_ids": x})
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
            return h.pow(2).mean()

    return loss_fn, ids


def _empirical_fisher(
    loss_fn: Callable[[dict[str, Any], Any], Any], params: dict[str, Any], x: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Fisher diagonal (mean squared per-sample gradient) and the mean gradient, per parameter tensor."""
    import torch

    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    grads_total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(x)):  # per-sample (per-window) gradients: the empirical Fisher
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        g = torch.autograd.grad(loss_fn(leaves, x[i : i + 1]), list(leaves.values()), allow_unused=True)
        for (k, _), gi in zip(leaves.items(), g, strict=True):
            if gi is not None:
                fisher[k] += gi.pow(2) / len(x)
                grads_total[k] += gi / len(x)
    return fisher, grads_total


FISHER_MAP_CELLS = 32


def fisher_maps(fisher: dict[str, Any], rows: list[dict[str, Any]], top: int = 4) -> list[dict[str, Any]]:
    """Heatmaps of the Fisher diagonal of the `top` 2-D weights by Fisher trace: each matrix mean-pooled
    to at most FISHER_MAP_CELLS² cells (log10), so where in a matrix the loss is sensitive is visible."""
    mats = sorted((r for r in rows if fisher[r["name"]].dim() >= 2), key=lambda r: -r["fisher_trace"])[:top]
    out = []
    for r in mats:
        f = fisher[r["name"]].reshape(fisher[r["name"]].shape[0], -1).double().numpy()
        grid = _pool(f, FISHER_MAP_CELLS)
        out.append(
            {
                "name": r["name"],
                "shape": list(f.shape),
                "log10_fisher": np.log10(np.maximum(grid, 1e-30)).round(4).tolist(),
            }
        )
    return out


def _pool(a: np.ndarray, cells: int) -> np.ndarray:
    """Mean over a near-even grid of at most cells × cells blocks."""
    rows = np.array_split(np.arange(a.shape[0]), min(cells, a.shape[0]))
    cols = np.array_split(np.arange(a.shape[1]), min(cells, a.shape[1]))
    return np.array([[a[np.ix_(r, c)].mean() for c in cols] for r in rows])


@dataclass(frozen=True)
class _Inputs(StageInputs):
    """What the metrics stage joins: the checkpoint, its data and settings, the weight shards, and the
    traces CKA compares (this audit's, its variants', other audits')."""

    shards: list[StageRecord]
    traces: dict[str, str]
    trace: StageRecord | None
    variant_traces: dict[str, StageRecord] | None
    compare: dict[str, StageRecord] | None


def run(
    inp: StageInputs,
    shards: list[StageRecord],
    trace: StageRecord | None = None,
    variant_traces: dict[str, StageRecord] | None = None,
    compare: dict[str, StageRecord] | None = None,
) -> StageRecord:
    """Joins the shards' weight statistics (flags need the whole model), then sensitivity and CKA
    between traced layers, variants and the traces of other audits (`compare`: audit id → fp trace)."""
    traces = {"fp": trace.config_hash or ""} if trace else {}
    traces |= {k: v.config_hash or "" for k, v in (variant_traces or {}).items()}
    traces |= {f"audit:{k}": v.config_hash or "" for k, v in (compare or {}).items()}
    chash = config_hash(inp.cfg, inp.dataset_digest, traces)
    prefix = stage_prefix(inp.model_digest, "metrics", chash)
    joined = inp.extend(
        _Inputs, shards=shards, traces=traces, trace=trace, variant_traces=variant_traces, compare=compare
    )
    return run_stage(inp.store, "metrics", prefix, chash, lambda run: _compute(run, joined))


def _compute(run: StageRun, inp: _Inputs) -> StageRecord:
    cfg, store, shards = inp.cfg, inp.store, inp.shards
    rows, spectra, raw = _joined_shards(store, shards)
    flag(rows, cfg)
    vectors = standardise_layers(raw)
    sens: list[dict[str, Any]] = []
    maps: list[dict[str, Any]] = []
    fisher_key = None
    if cfg.metrics.sensitivity:
        sens, maps, fisher_key = _sensitivity_figures(run, inp)
    cka = _cka(store, inp.trace, inp.variant_traces or {}, inp.compare or {}, cfg.metrics.cka_tokens)
    artifacts = {
        "spectra": store.put_bytes(f"{run.prefix}/spectra.npz", _npz(spectra)),
        "layer_vectors": store.put_bytes(f"{run.prefix}/layer_vectors.npz", _npz(vectors)),
        "table": store.put_json(f"{run.prefix}/weights.json", rows),
        "sensitivity": store.put_json(f"{run.prefix}/sensitivity.json", sens),
    }
    if fisher_key:
        artifacts["fisher"] = store.uri_for(fisher_key)
    metrics, undefined = _summary(rows, sens)
    return run.record(
        input_digests={
            "model": inp.model_digest,
            "dataset": inp.dataset_digest,
            **inp.traces,
        },
        artifacts=artifacts,
        metrics=metrics,
        undefined=undefined,
        details=MetricsDetails(
            prefix=run.prefix,
            weights=rows,
            sensitivity=sens,
            fisher_maps=maps,
            fisher_key=fisher_key,
            cka=cka,
            vectors_key=f"{run.prefix}/layer_vectors.npz",
            shards=[s.details["prefix"] for s in shards],
        ),
    )


def _joined_shards(
    store: ArtifactStore, shards: list[StageRecord]
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The shards' weight rows (sorted by name), spectra and raw layer embeddings, joined."""
    parts = [metrics_shard_details(s) for s in shards]
    rows = sorted((r.model_dump(mode="json") for p in parts for r in p.weights), key=lambda r: r["name"])
    spectra: dict[str, np.ndarray] = {}
    raw: dict[str, np.ndarray] = {}
    for p in parts:
        spectra |= dict(np.load(_io.BytesIO(store.get_bytes(p.spectra_key))))
        raw |= dict(np.load(_io.BytesIO(store.get_bytes(p.vectors_key))))
    return rows, spectra, raw


def _sensitivity_figures(run: StageRun, inp: _Inputs) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Sensitivity rows and Fisher heatmaps on the audit's data; the Fisher diagonal stored in full."""
    model = loading.load_model(inp.ref, loading.compute_device())
    inputs, labels = open_data(inp.ingest, inp.store).sensitivity_inputs(inp.cfg)
    sens, fisher = sensitivity(model, inp.arch, inputs, inp.cfg, labels=labels)
    maps = fisher_maps(fisher, sens)
    fisher_key = f"{run.prefix}/fisher.safetensors"
    inp.store.put_bytes(fisher_key, _safetensors(fisher))
    return sens, maps, fisher_key


def _summary(rows: list[dict[str, Any]], sens: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, str]]:
    """The stage's figures over all matrices, split into defined ones and the reasons of undefined ones."""
    fitted = [r for r in rows if figures.is_number(r["alpha"])]
    no_fit = figures.Undefined(f"none of the {len(rows)} matrices' spectra has a power-law fit (see each α)")
    metrics, undefined = figures.split(
        {
            "matrices": float(len(rows)),
            "flagged": float(sum(1 for r in rows if r["flags"])),
            "randomized": float(sum(1 for r in rows if r["spectrum"] == "randomized")),
            "alpha_mean": float(np.mean([r["alpha"] for r in fitted])) if fitted else no_fit,
            "alpha_weighted_mean": float(np.mean([r["alpha_weighted"] for r in fitted])) if fitted else no_fit,
        }
    )
    if sens:
        metrics["hessian_trace_total"] = float(sum(r["hessian_trace"] for r in sens))
        metrics["fisher_trace_total"] = float(sum(r["fisher_trace"] for r in sens))
    return metrics, undefined


def _sample_rows(store: ArtifactStore, parts: list[str], n: int) -> np.ndarray:
    import pyarrow.parquet as pq

    out, got = [], 0
    for key in parts:
        f = pq.ParquetFile(store.local_path(key))
        for rg in range(f.num_row_groups):
            col = f.read_row_group(rg, columns=["activation"]).column("activation").combine_chunks()
            out.append(np.asarray(col.flatten()).reshape(len(col), col.type.list_size))
            got += len(col)
            if got >= n:
                return np.concatenate(out)[:n]
    return np.concatenate(out)[:n] if out else np.zeros((0, 0))


def _cka(
    store: ArtifactStore,
    trace: StageRecord | None,
    variants: dict[str, StageRecord],
    compare: dict[str, StageRecord],
    n: int,
) -> dict[str, Any]:
    """CKA between all traced layers (the same first n tokens of each), per hook fp vs each variant, and
    per hook this checkpoint vs the checkpoints of other audits (same dataset: the same tokens)."""
    if trace is None or not trace.details.get("datasets"):
        return {}
    reps = {h: _sample_rows(store, d["parts"], n) for h, d in trace.details["datasets"].items()}
    names, matrix = cka_matrix(reps)
    out: dict[str, Any] = {"layers": names, "matrix": matrix.tolist(), "variants": {}, "audits": {}, "tokens": n}
    for group, others in (("variants", variants), ("audits", compare)):
        for key, vt in others.items():
            same = vt.input_digests.get("dataset") == trace.input_digests.get("dataset")
            if group == "audits" and not same:
                out.setdefault("skipped", {})[key] = "traced another dataset; CKA needs the same tokens"
                continue
            for h, d in vt.details.get("datasets", {}).items():
                if h in reps:
                    other = _sample_rows(store, d["parts"], n)
                    if len(other) == len(reps[h]):
                        out[group].setdefault(key, {})[h] = linear_cka(reps[h], other)
    return out


def _safetensors(tensors: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = _io.BytesIO()
    np.savez(buf, **{k.replace("/", "_"): v for k, v in arrays.items()})
    return buf.getvalue()
