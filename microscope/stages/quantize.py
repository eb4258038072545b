"""quantize: one variant of the model, its cost (memory, disk) and its fidelity to full precision."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from schemas.config import AuditConfig, canonical_hash
from schemas.records import Architecture, ModelRef, StageRecord

from microscope import quantization as qz
from microscope.fidelity import ActivationDrift, LogitFidelity
from microscope.figures import Figure, split
from microscope.modality import open_data
from microscope.models import loading
from microscope.stages.runner import StageRun, run_stage, stage_prefix
from microscope.store import ArtifactStore
from microscope.trace import capture, hook_name

VERSION = "1"


def config_hash(cfg: AuditConfig, fmt: str, dataset_digest: str) -> str:
    q = cfg.quantize.model_dump(exclude={"formats", "trace_variants"})
    points = {"layers": cfg.trace.layers, "hooks": cfg.trace.hooks}
    return canonical_hash({"v": VERSION, "format": fmt, "quantize": q, "points": points, "dataset": dataset_digest})


def _logits(out: Any) -> Any:
    return getattr(out, "logits", None)


def fidelity(
    fp_model: Any, q_model: Any, ids: np.ndarray, points: dict[tuple[int, str], str], batch: int, causal: bool
) -> tuple[dict[str, Figure], dict[str, dict[str, float]]]:
    """Logit statistics (undefined where the model has no logits) and per-hook activation drift on `ids`."""
    import torch

    logit_fid, drift = LogitFidelity(), ActivationDrift()
    names = {lh: hook_name(*lh) for lh in points}
    device = next(fp_model.parameters()).device
    for lo in range(0, len(ids), batch):
        x = torch.from_numpy(ids[lo : lo + batch].astype(np.int64)).to(device)
        with torch.inference_mode(), capture(fp_model, points) as acts_fp:
            out_fp = fp_model(input_ids=x)
        with torch.inference_mode(), capture(q_model, points) as acts_q:
            out_q = q_model(input_ids=x)
        for lh in points:
            drift.update(names[lh], acts_fp[lh].float().cpu(), acts_q[lh].float().cpu())
        lf, lq = _logits(out_fp), _logits(out_q)
        x = x.cpu()  # the statistics are NumPy: compared on the CPU
        lf, lq = (None if t is None else t.cpu() for t in (lf, lq))
        if lf is not None and lq is not None:
            if causal:  # position t predicts token t+1
                logit_fid.update(lf[:, :-1].float(), lq[:, :-1].float(), x[:, 1:])
            else:
                logit_fid.update(lf.float(), lq.float(), None)
    return logit_fid.summary(), drift.summary()


def _classify(model: Any, x: Any) -> Any:
    """Float32 logits on the CPU; the images go in at the model's own dtype (fp16 and bf16 variants)."""
    from microscope.robustness.surfaces import float_dtype

    return model(x.to(float_dtype(model))).float().cpu()


def image_fidelity(fp_model: Any, q_model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """A classifier's fidelity on its images: class-distribution KL, top-1 agreement, |Δp| of the true
    class and Δ perplexity of the labels, plus the accuracy of both models."""
    import torch

    lf, acc = LogitFidelity(), {"fp": 0, "q": 0}
    for lo in range(0, len(x), 256):
        xb, yb = torch.from_numpy(x[lo : lo + 256]), torch.from_numpy(y[lo : lo + 256])
        device = next(fp_model.parameters()).device
        with torch.inference_mode():
            out_fp, out_q = (_classify(m, xb.to(device)) for m in (fp_model, q_model))
        lf.update(out_fp, out_q, yb)
        acc["fp"] += int((out_fp.argmax(-1) == yb).sum())
        acc["q"] += int((out_q.argmax(-1) == yb).sum())
    return lf.summary() | {"accuracy_fp": acc["fp"] / len(x), "accuracy_q": acc["q"] / len(x)}


def run(
    ref: ModelRef, ingest: StageRecord, arch: Architecture, fmt: str, cfg: AuditConfig, store: ArtifactStore
) -> StageRecord:
    qz.check_format(fmt)
    model_digest, dataset_digest = ingest.details["model_digest"], ingest.details["dataset_digest"]
    chash = config_hash(cfg, fmt, dataset_digest)
    prefix = stage_prefix(model_digest, "quantize", chash)
    return run_stage(
        store,
        "quantize",
        prefix,
        chash,
        lambda run: _compute(run, ref, ingest, arch, fmt, cfg, store),
        variant=fmt,
    )


def _compute(
    run: StageRun,
    ref: ModelRef,
    ingest: StageRecord,
    arch: Architecture,
    fmt: str,
    cfg: AuditConfig,
    store: ArtifactStore,
) -> StageRecord:
    prefix = run.prefix
    device = loading.compute_device()
    fp_model = loading.load_model(ref, device)
    estimate = qz.estimate_bytes(fp_model, fmt, cfg.quantize)
    q_model, produced, attempts = qz.produce(ref, fmt, cfg.quantize, fp_model, device)
    with tempfile.TemporaryDirectory() as tmp:  # saved first: see quantization._load_bnb
        files = qz.save_variant(q_model, produced, Path(tmp) / "variant")
        on_disk = sum(f.stat().st_size for f in files)
        artifacts = {}
        for f in files:
            rel = f"variant/{f.relative_to(Path(tmp) / 'variant').as_posix()}"
            artifacts[rel] = store.put_file(f"{prefix}/{rel}", f)
    measured = qz.measured_bytes(q_model)
    evaluated, logit_stats, drift = open_data(ingest, store).fidelity(fp_model, q_model, arch, cfg)
    worst = max(drift.items(), key=lambda kv: kv[1]["rel_error"])[0] if drift else None
    # Logit figures are undefined (with the reason) for a model without logits or next-token targets.
    metrics, undefined = split(
        {
            "estimated_bytes": float(qz.estimate_bytes(fp_model, produced, cfg.quantize)),
            "measured_bytes": float(measured),
            "fp_bytes": float(qz.measured_bytes(fp_model)),
            "on_disk_bytes": float(on_disk),
            **logit_stats,
        }
    )
    if drift:
        metrics["min_cosine"] = min(v["cosine"] for v in drift.values())
        metrics["max_rel_error"] = max(v["rel_error"] for v in drift.values())
    return run.record(
        input_digests={"model": ingest.details["model_digest"], "dataset": ingest.details["dataset_digest"]},
        artifacts=artifacts,
        metrics=metrics,
        undefined=undefined,
        details={
            "requested": fmt,
            "produced": produced,
            "fell_back": produced != fmt,
            "attempts": attempts,
            "estimated_bytes_requested": estimate,
            "description": qz.FORMATS[produced].description,
            "paths": qz.kernel_paths(q_model),  # compute path -> quantized layers running it
            "drift": drift,
            "most_drifting_hook": worst,
            "eval_tokens": evaluated,
        },
    )
