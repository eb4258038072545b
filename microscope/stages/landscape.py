"""landscape: the loss's curvature (top Hessian eigenvalues), 1-D and 2-D slices along filter-normalised
directions, sharpness, a Lipschitz bound and the Jacobian norm, on a fixed, recorded subset of the audit's
data (microscope/landscape.py holds the evaluation, microscope/curvature.py the mathematics). Diagnostics:
compare checkpoints of one run, or a model with its variants, not across models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.config import AuditConfig, canonical_hash
from schemas.details.landscape import LandscapeDetails
from schemas.records import StageRecord

from microscope.errors import InputError
from microscope.figures import Undefined, split
from microscope.modality import ImageData, open_data
from microscope.models import loading
from microscope.quantization import variant_identity
from microscope.stages.inputs import StageInputs
from microscope.stages.runner import StageRun, run_for_variant

VERSION = "1"


def config_hash(cfg: AuditConfig, dataset_digest: str, variant: str) -> str:
    lc = cfg.landscape.model_dump(exclude={"variants", "batch_size"})  # they change what runs, not results
    return canonical_hash(
        {
            "v": VERSION,
            "landscape": lc,
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
    return run_for_variant(inp, "landscape", chash, lambda r: _compute(r, job), variant)


def _compute(run: StageRun, job: _Job) -> StageRecord:
    from microscope.landscape import evaluate, loss_subset_images, loss_subset_text
    from microscope.quantization import load_audited

    lc, data = job.cfg.landscape, open_data(job.ingest, job.store)
    model = load_audited(job.ref, job.variant, job.cfg.quantize, loading.compute_device(), job.calibration)
    for p in model.parameters():  # variants load frozen; curvature differentiates every float weight
        p.requires_grad_(p.is_floating_point())
    try:
        if isinstance(data, ImageData):
            indices, loss_fn = loss_subset_images(data.x, data.y, lc, job.cfg.seed)
        else:
            causal = job.arch.is_causal and job.arch.has_unembedding
            indices, loss_fn = loss_subset_text(data.ids, lc, job.cfg.seed, causal)
    except ValueError as exc:  # an encoder without a head has no loss: the landscape is undefined, not an error
        return _undefined(run, job, str(exc))
    try:
        results = evaluate(model, loss_fn, lc, job.cfg.seed, loss_fn.jacobian_inputs)
    except ValueError as exc:
        raise InputError(str(exc) if str(exc).startswith("landscape:") else f"landscape: {exc}") from exc
    results |= {"variant": job.variant, "subset": [int(i) for i in indices]}
    artifacts = {"results": job.store.put_json(run.key("results.json"), results)}
    metrics, undefined = split(_figures(results))
    return run.record(
        input_digests={"model": job.model_digest, "dataset": job.dataset_digest},
        artifacts=artifacts,
        metrics=metrics,
        undefined=undefined,
        details=LandscapeDetails(prefix=run.prefix, **_small(results)),
    )


def _figures(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(results.get("figures") or {})
    out |= {k: Undefined(v) for k, v in (results.get("undefined") or {}).items()}
    return out


def _small(results: dict[str, Any]) -> dict[str, Any]:
    """The details carry everything but the subset's indices (results.json keeps them)."""
    from microscope.landscape import small

    return small(results)


def _undefined(run: StageRun, job: _Job, why: str) -> StageRecord:
    """No loss for this model: a finished record whose figures are undefined with the reason."""
    results = {"variant": job.variant, "undefined_reason": why}
    return run.record(
        input_digests={"model": job.model_digest, "dataset": job.dataset_digest},
        artifacts={"results": job.store.put_json(run.key("results.json"), results)},
        metrics={},
        undefined={"loss": why, "lambda_max": why, "rho_sharpness": why},
        details=LandscapeDetails.undefined_for(run.prefix, job.variant, why),
    )
