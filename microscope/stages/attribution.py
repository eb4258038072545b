"""attribution: which inputs drive the model's decisions and through which blocks: saliency, Integrated
Gradients (with their completeness), SmoothGrad, per-block shares and the model-randomisation check, on the
same seeded samples for full precision and (optionally) each variant (microscope/attribution_eval.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.config import AuditConfig, canonical_hash
from schemas.details.attribution import AttributionDetails
from schemas.records import Architecture, StageRecord

from microscope.errors import InputError
from microscope.figures import split
from microscope.modality import ImageData, open_data
from microscope.models import loading
from microscope.quantization import variant_identity
from microscope.stages.inputs import StageInputs
from microscope.stages.runner import StageRun, run_for_variant

VERSION = "1"


def config_hash(cfg: AuditConfig, dataset_digest: str, variant: str) -> str:
    ac = cfg.attribution.model_dump(exclude={"variants"})
    return canonical_hash(
        {
            "v": VERSION,
            "attribution": ac,
            "dataset": dataset_digest,
            "variant": variant_identity(cfg.quantize, variant),
            "seed": cfg.seed,
        }
    )


@dataclass(frozen=True)
class _Job(StageInputs):
    variant: str


def run(inp: StageInputs, variant: str = "fp") -> StageRecord:
    chash = config_hash(inp.cfg, inp.dataset_digest, variant)
    job = inp.extend(_Job, variant=variant)
    return run_for_variant(inp, "attribution", chash, lambda r: _compute(r, job), variant)


def blocks_of(model: Any, arch: Architecture) -> dict[str, Any]:
    """The blocks attribution is shared among: a transformer's blocks (the traced residual points), else the
    model's top-level modules that hold parameters (a CNN's conv1, conv2, fc, head)."""
    if arch.hook_points:
        return {p.resid: model.get_submodule(p.resid) for p in arch.hook_points}
    return {n: m for n, m in model.named_children() if any(True for _ in m.parameters())}


def _compute(run: StageRun, job: _Job) -> StageRecord:
    from microscope.attribution_eval import evaluate_images, evaluate_text, small
    from microscope.quantization import load_audited

    ac, data = job.cfg.attribution, open_data(job.ingest, job.store)
    model = load_audited(job.ref, job.variant, job.cfg.quantize, loading.compute_device(), job.calibration)
    blocks = blocks_of(model, job.arch)
    try:
        if isinstance(data, ImageData):  # microscope.attribution's image maps run on CPU tensors
            results = evaluate_images(model.cpu(), data.x, data.y, ac, job.cfg.seed, blocks)
        else:
            causal = job.arch.is_causal and job.arch.has_unembedding
            tokenizer = loading.load_tokenizer(job.ref) if job.ref.tokenizer or job.ref.resolved_path else None
            results = evaluate_text(model, data.ids, ac, job.cfg.seed, causal, blocks, tokenizer)
    except ValueError as exc:  # the one-line refusals (no samples, no logits) are input errors
        raise InputError(str(exc) if str(exc).startswith("attribution:") else f"attribution: {exc}") from exc
    results["variant"] = job.variant
    artifacts = {"results": job.store.put_json(run.key("results.json"), results)}
    metrics, undefined = split(dict(results.get("figures") or {}))
    return run.record(
        input_digests={"model": job.model_digest, "dataset": job.dataset_digest},
        artifacts=artifacts,
        metrics=metrics,
        undefined=undefined,
        details=AttributionDetails(prefix=run.prefix, **small(results)),
    )
