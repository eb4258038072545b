"""metrics: weight spectra and statistics of every matrix, anomaly flags, loss sensitivity (gradient
norms, Fisher diagonal, Hutchinson Hessian traces) and CKA between traced layers and variants."""

from __future__ import annotations

import io as _io
import re
from typing import Any

import numpy as np
from schemas.config import AuditConfig, canonical_hash
from schemas.records import Architecture, ModelRef, StageRecord, StageStatus

from microscope import dataset as ds
from microscope.cka import cka_matrix, linear_cka
from microscope.models import loading
from microscope.spectra import esd_histogram, matrix_stats, mp_spikes, power_law_fit
from microscope.stages import from_manifest, stage_prefix, timed
from microscope.store import ArtifactStore
from microscope.vectors import layer_embedding

VERSION = "3"  # 3: ESD histograms in the weight rows


def config_hash(cfg: AuditConfig, dataset_digest: str, traces: dict[str, str]) -> str:
    return canonical_hash(
        {
            "v": VERSION,
            "metrics": cfg.metrics.model_dump(),
            "dataset": dataset_digest,
            "traces": dict(sorted(traces.items())),
        }
    )


def _blocks_path(arch: Architecture) -> str:
    """'transformer.h' for GPT-2: the ModuleList the hook points live in."""
    return arch.hook_points[0].resid.rsplit(".", 1)[0] if arch.hook_points else ""


def layer_index(name: str, blocks: str) -> int:
    """Block index of a parameter name (-1 outside the blocks: embeddings, heads)."""
    m = re.match(re.escape(blocks) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def weight_table(
    model: Any, blocks: str, cfg: AuditConfig
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One row per 2-D weight (conv kernels reshaped), its singular values and its layer embedding."""
    rows, spectra, vectors = [], {}, {}
    for name, t in loading.unique_state(model):
        if not t.is_floating_point() or t.dim() < 2:  # biases and norms are not matrices
            continue
        stats = matrix_stats(t.detach().float().numpy(), cfg.metrics.near_zero, cfg.metrics.cond_floor)
        fit = power_law_fit(stats["singular_values"])
        sv = stats.pop("singular_values")
        spectra[name] = sv
        vectors[name] = layer_embedding({**stats, "singular_values": sv}, fit)
        rows.append(
            {
                "name": name,
                "layer": layer_index(name, blocks),
                **stats,
                **fit,
                "mp_spikes": mp_spikes(sv, tuple(stats["shape"])),
                "esd": esd_histogram(sv),
            }
        )
    return rows, spectra, vectors


def flag(rows: list[dict[str, Any]], cfg: AuditConfig) -> None:
    """Adds `flags` (list of reasons) to each row."""
    lo, hi = cfg.metrics.alpha_range
    log_cond = np.log10([max(r["condition_number"], 1.0) for r in rows])
    med = float(np.median(log_cond))
    mad = float(np.median(np.abs(log_cond - med))) or 1e-12
    for r, lc in zip(rows, log_cond, strict=True):
        reasons = []
        if np.isfinite(r["alpha"]) and not lo <= r["alpha"] <= hi:
            reasons.append(f"alpha {r['alpha']:.2f} outside [{lo:g}, {hi:g}]")
        if r["effective_rank"] < cfg.metrics.erank_floor * min(r["shape"]):
            reasons.append(f"effective rank {r['effective_rank']:.1f} < {cfg.metrics.erank_floor:g}·{min(r['shape'])}")
        z = 0.6745 * (lc - med) / mad  # robust z-score of log10 condition number across the model
        if z > cfg.metrics.robust_z:
            reasons.append(f"condition number {r['condition_number']:.3g} (robust z {z:.1f})")
        r["flags"] = reasons


def sensitivity(model: Any, arch: Architecture, ids: np.ndarray, cfg: AuditConfig) -> list[dict[str, Any]]:
    """Per parameter tensor: gradient norm, Fisher diagonal trace and max, Hutchinson trace ± s.e.
    Loss: next-token CE for causal LMs; for encoders a documented proxy, the mean squared final hidden
    state (its curvature measures how strongly each block moves the output representation)."""
    import torch
    from torch.func import functional_call

    from microscope.sensitivity import hutchinson_trace

    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # double backward through fused attention is not implemented
    params = {k: v.detach() for k, v in model.named_parameters()}
    causal = arch.is_causal and arch.has_unembedding

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if causal:
            return functional_call(model, p, (), {"input_ids": x, "labels": x, "use_cache": False}).loss
        out = functional_call(model, p, (), {"input_ids": x})
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        return h.pow(2).mean()

    x = torch.from_numpy(ids.astype(np.int64))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    grads_total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(x)):  # per-sample (per-window) gradients: the empirical Fisher
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        g = torch.autograd.grad(loss_fn(leaves, x[i : i + 1]), list(leaves.values()), allow_unused=True)
        for (k, _), gi in zip(leaves.items(), g, strict=True):
            if gi is not None:
                fisher[k] += gi.pow(2) / len(x)
                grads_total[k] += gi / len(x)
    hutch = hutchinson_trace(loss_fn, params, x, probes=cfg.metrics.hutchinson_probes, seed=cfg.seed)
    blocks = _blocks_path(arch)
    return [
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


def run(
    ref: ModelRef,
    ingest: StageRecord,
    arch: Architecture,
    cfg: AuditConfig,
    store: ArtifactStore,
    trace: StageRecord | None = None,
    variant_traces: dict[str, StageRecord] | None = None,
) -> StageRecord:
    traces = {"fp": trace.config_hash or ""} if trace else {}
    traces |= {k: v.config_hash or "" for k, v in (variant_traces or {}).items()}
    chash = config_hash(cfg, ingest.details["dataset_digest"], traces)
    prefix = stage_prefix(ingest.details["model_digest"], "metrics", chash)
    manifest = store.read_manifest(prefix)
    if manifest is not None:
        return from_manifest(manifest)
    times: dict[str, Any] = {}
    with timed(times):
        model = loading.load_model(ref)
        blocks = _blocks_path(arch)
        rows, spectra, vectors = weight_table(model, blocks, cfg)
        flag(rows, cfg)
        ids, _ = ds.read_tokens(store.local_path(ingest.details["tokens_key"]))
        sens = sensitivity(model, arch, ids[-cfg.metrics.sensitivity_windows :], cfg) if cfg.metrics.sensitivity else []
        cka = _cka(store, trace, variant_traces or {}, cfg.metrics.cka_tokens)
        artifacts = {
            "spectra": store.put_bytes(f"{prefix}/spectra.npz", _npz(spectra)),
            "layer_vectors": store.put_bytes(f"{prefix}/layer_vectors.npz", _npz(vectors)),
            "table": store.put_json(f"{prefix}/weights.json", rows),
            "sensitivity": store.put_json(f"{prefix}/sensitivity.json", sens),
        }
    alphas = [r["alpha"] for r in rows if np.isfinite(r["alpha"])]
    metrics = {
        "matrices": float(len(rows)),
        "flagged": float(sum(1 for r in rows if r["flags"])),
        "alpha_mean": float(np.mean(alphas)) if alphas else float("nan"),
        "alpha_weighted_mean": float(np.mean([r["alpha_weighted"] for r in rows if np.isfinite(r["alpha"])]))
        if alphas
        else float("nan"),
    }
    if sens:
        metrics["hessian_trace_total"] = float(sum(r["hessian_trace"] for r in sens))
        metrics["fisher_trace_total"] = float(sum(r["fisher_trace"] for r in sens))
    record = StageRecord(
        stage="metrics",
        status=StageStatus.completed,
        config_hash=chash,
        input_digests={"model": ingest.details["model_digest"], "dataset": ingest.details["dataset_digest"], **traces},
        artifacts={**artifacts, "manifest": store.uri_for(f"{prefix}/manifest.json")},
        metrics=metrics,
        details={
            "prefix": prefix,
            "weights": rows,
            "sensitivity": sens,
            "cka": cka,
            "vectors_key": f"{prefix}/layer_vectors.npz",
        },
        **times,
    )
    store.write_manifest(prefix, {"record": record.model_dump(mode="json")})
    return record


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


def _cka(store: ArtifactStore, trace: StageRecord | None, variants: dict[str, StageRecord], n: int) -> dict[str, Any]:
    """CKA between all traced layers (the same first n tokens of each) and, per hook, fp vs each variant."""
    if trace is None or not trace.details.get("datasets"):
        return {}
    reps = {h: _sample_rows(store, d["parts"], n) for h, d in trace.details["datasets"].items()}
    names, matrix = cka_matrix(reps)
    across: dict[str, dict[str, float]] = {}
    for variant, vt in variants.items():
        for h, d in vt.details.get("datasets", {}).items():
            if h in reps:
                across.setdefault(variant, {})[h] = linear_cka(reps[h], _sample_rows(store, d["parts"], n))
    return {"layers": names, "matrix": matrix.tolist(), "variants": across, "tokens": n}


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = _io.BytesIO()
    np.savez(buf, **{k.replace("/", "_"): v for k, v in arrays.items()})
    return buf.getvalue()
