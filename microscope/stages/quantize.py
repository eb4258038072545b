"""quantize: one variant of the model, its cost (memory, disk) and its fidelity to full precision."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from schemas.config import AuditConfig, canonical_hash
from schemas.details import QuantizeDetails
from schemas.details.inputs import Pruning
from schemas.records import StageRecord

from microscope import pruning
from microscope import quantization as qz
from microscope.figures import split
from microscope.modality import open_data
from microscope.models import loading
from microscope.stages.inputs import StageInputs
from microscope.stages.runner import StageRun, run_stage, stage_prefix

# 2: 4-bit layers dequantize over the flattened weight on every host (AVX512 CPUs took blocks per row)
VERSION = "2"


def config_hash(cfg: AuditConfig, fmt: str, dataset_digest: str) -> str:
    q = cfg.quantize.model_dump(exclude={"formats", "trace_variants"})
    points = {"layers": cfg.trace.layers, "hooks": cfg.trace.hooks}
    return canonical_hash(
        {
            "v": VERSION,
            "format": qz.variant_identity(cfg.quantize, fmt),
            "quantize": q,
            "points": points,
            "dataset": dataset_digest,
        }
    )


def run(inp: StageInputs, fmt: str) -> StageRecord:
    qz.check_format(fmt)
    chash = config_hash(inp.cfg, fmt, inp.dataset_digest)
    prefix = stage_prefix(inp.model_digest, "quantize", chash)
    return run_stage(inp.store, "quantize", prefix, chash, lambda run: _compute(run, inp, fmt), variant=fmt)


def _compute(run: StageRun, inp: StageInputs, fmt: str) -> StageRecord:
    ref, ingest, arch, cfg, store, prefix = inp.ref, inp.ingest, inp.arch, inp.cfg, inp.store, run.prefix
    device = loading.compute_device()
    fp_model = loading.load_model(ref, device)
    estimate = qz.estimate_bytes(fp_model, fmt, cfg.quantize)
    data = open_data(ingest, store)
    calibration = data.pruning_calibration(arch, cfg) if pruning.is_pruning(fmt) else None
    q_model, produced, attempts = qz.produce(ref, fmt, cfg.quantize, fp_model, device, lambda: calibration)
    with tempfile.TemporaryDirectory() as tmp:  # saved first: see quantization._load_bnb
        files = qz.save_variant(q_model, produced, Path(tmp) / "variant")
        on_disk = sum(f.stat().st_size for f in files)
        artifacts = {}
        for f in files:
            rel = f"variant/{f.relative_to(Path(tmp) / 'variant').as_posix()}"
            artifacts[rel] = store.put_file(f"{prefix}/{rel}", f)
    measured = qz.measured_bytes(q_model)
    evaluated, logit_stats, drift = data.fidelity(fp_model, q_model, arch, cfg)
    pruned = _pruned(fmt, getattr(q_model, "microscope_pruning", None), calibration)
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
    if pruned is not None:
        metrics["sparsity"] = pruned.overall
    if drift:
        metrics["min_cosine"] = min(v["cosine"] for v in drift.values())
        metrics["max_rel_error"] = max(v["rel_error"] for v in drift.values())
    return run.record(
        input_digests={"model": inp.model_digest, "dataset": inp.dataset_digest},
        artifacts=artifacts,
        metrics=metrics,
        undefined=undefined,
        details=QuantizeDetails(
            prefix=run.prefix,
            requested=fmt,
            produced=produced,
            fell_back=produced != fmt,
            attempts=attempts,
            estimated_bytes_requested=estimate,
            description=qz.format_info(produced).description,
            paths=qz.kernel_paths(q_model),  # compute path -> quantized layers running it
            drift=drift,
            most_drifting_hook=worst,
            eval_tokens=evaluated,
            pruning=pruned,
        ),
    )


def _pruned(fmt: str, report: dict[str, float | str] | None, calibration: Any) -> Pruning | None:
    """The pruning report of a pruned variant as its details say it."""
    if report is None:
        return None
    spec = pruning.parse_format(fmt)
    matrices = {k: float(v) for k, v in report.items() if k not in ("overall", "note")}
    return Pruning(
        method=spec.method,
        scope=spec.scope,
        target=spec.sparsity,
        overall=float(report["overall"]),
        matrices=matrices,
        calibration=calibration.description if calibration is not None and spec.method != "magnitude" else None,
        note=str(report["note"]),
    )
