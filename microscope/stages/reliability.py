"""reliability: calibration, OOD detection and common corruptions of the full-precision model or one of its
quantized variants, on the same seeded samples (microscope/reliability/ holds the mathematics)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.config import OOD_SCORES, AuditConfig, canonical_hash
from schemas.details import ReliabilityDetails
from schemas.records import StageRecord

from microscope.errors import InputError
from microscope.figures import Undefined, split
from microscope.modality import ImageData, open_data
from microscope.models import loading
from microscope.quantization import variant_identity
from microscope.stages.inputs import StageInputs
from microscope.stages.runner import StageRun, run_for_variant

VERSION = "2"  # 2: k-NN's k from the fit split's size


def config_hash(cfg: AuditConfig, dataset_digest: str, variant: str, baseline: str = "") -> str:
    rc = cfg.reliability.model_dump(exclude={"variants", "batch_size"})  # they change what runs, not results
    ood = _file_digest(cfg.reliability.ood_dataset) if cfg.reliability.ood_dataset else ""
    return canonical_hash(
        {
            "v": VERSION,
            "reliability": rc,
            "dataset": dataset_digest,
            "variant": variant_identity(cfg.quantize, variant),
            "baseline": baseline,
        }
        | {"seed": cfg.seed, "ood_dataset": ood}
    )


def _file_digest(path: str) -> str:
    """The OOD dataset's bytes, so that a changed file is not answered from the cache (a missing one is
    refused with its fix when the stage runs)."""
    import hashlib
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        return f"missing:{path}"
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class _Job(StageInputs):
    variant: str
    baseline: StageRecord | None  # the full-precision record: corruption errors of a variant relative to it


def run(inp: StageInputs, variant: str = "fp", baseline: StageRecord | None = None) -> StageRecord:
    base = baseline.config_hash or "" if baseline is not None else ""
    chash = config_hash(inp.cfg, inp.dataset_digest, variant, base)
    job = inp.extend(_Job, variant=variant, baseline=baseline)
    return run_for_variant(inp, "reliability", chash, lambda r: _compute(r, job), variant)


def _compute(run: StageRun, job: _Job) -> StageRecord:
    from microscope.quantization import load_audited
    from microscope.reliability.evaluate import evaluate_images, evaluate_text

    rc, data = job.cfg.reliability, open_data(job.ingest, job.store)
    model = load_audited(job.ref, job.variant, job.cfg.quantize, loading.compute_device(), job.calibration)
    try:
        if isinstance(data, ImageData):
            results = evaluate_images(model, data.x, data.y, rc, job.cfg.seed, rc.ood_dataset)
        else:
            causal = job.arch.is_causal and job.arch.has_unembedding
            tokenizer = loading.load_tokenizer(job.ref) if job.ref.tokenizer or job.ref.resolved_path else None
            results = evaluate_text(model, data.ids, rc, job.cfg.seed, causal, tokenizer, rc.ood_dataset)
    except ValueError as exc:  # the mathematics' one-line refusals (no classes, too few samples) are input errors
        raise InputError(f"reliability: {exc}") from exc
    results["variant"] = job.variant
    results["corruption_scores"] = _corruption_scores(results.get("corruptions"), job.baseline)
    results["corruption_scores_published"] = vs_published(results.get("corruptions"), rc)
    artifacts = {"results": job.store.put_json(run.key("results.json"), results)}
    metrics, undefined = split(headline(results))
    return run.record(
        input_digests={"model": job.model_digest, "dataset": job.dataset_digest},
        artifacts=artifacts,
        metrics=metrics,
        undefined=undefined,
        details=ReliabilityDetails(prefix=run.prefix, **_small(results)),
    )


PER_SAMPLE = ("prediction", "radius", "correct", "n_a", "p_a_lower")  # results.json only


def _small(results: dict[str, Any]) -> dict[str, Any]:
    """What the record's details carry: results.json without the per-sample lists."""
    out = {k: v for k, v in results.items() if k != "sample_indices"}
    if out.get("smoothing"):
        out["smoothing"] = {s: {k: v for k, v in c.items() if k not in PER_SAMPLE} for s, c in out["smoothing"].items()}
    return out


def _corruption_scores(corruptions: dict[str, Any] | None, baseline: StageRecord | None) -> dict[str, Any] | None:
    """Mean corruption accuracy, and corruption errors relative to the full-precision model for a variant."""
    if not corruptions:
        return None
    from microscope.reliability.corruptions import corruption_summary

    def ints(acc: dict[str, dict[str, float]]) -> dict[str, dict[int, float]]:
        return {c: {int(s): a for s, a in by.items()} for c, by in acc.items()}

    base = (baseline.details.get("corruptions") or None) if baseline is not None else None
    return corruption_summary(
        ints(corruptions["accuracy"]),
        corruptions["clean_accuracy"],
        ints(base["accuracy"]) if base else None,
        base["clean_accuracy"] if base else None,
    )


def vs_published(corruptions: dict[str, Any] | None, rc: Any) -> dict[str, Any] | None:
    """Corruption errors normalised by a reference model's published errors (AlexNet's mCE convention)."""
    if not corruptions or not rc.baseline_errors:
        return None
    from microscope.reliability.corruptions import corruption_summary

    acc = {c: {int(s): a for s, a in by.items()} for c, by in corruptions["accuracy"].items()}
    base = {c: {s: 1.0 - e for s, e in by.items()} for c, by in rc.baseline_errors.items()}
    clean = None if rc.baseline_clean_error is None else 1.0 - rc.baseline_clean_error
    return corruption_summary(acc, corruptions["clean_accuracy"], base, clean)


def _no_score(score: str, results: dict[str, Any]) -> str:
    if score in ("msp", "energy") and results.get("calibration") is None:
        return results.get("calibration_undefined") or "the model has no class probabilities"
    return f"the {score} score is not in reliability.scores"


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures a record's `metrics` carries (the rest stays in its details and results.json)."""
    out: dict[str, Any] = {"samples": float(results["n"])}
    c = results.get("calibration")
    if c is None:
        why = Undefined(results.get("calibration_undefined") or "no calibration for this model")
        out |= dict.fromkeys(("accuracy", "ece", "ace", "mce", "rms_ce", "nll", "brier", "temperature"), why)
    else:
        out |= {k: c[k] for k in ("accuracy", "ece", "ace", "mce", "rms_ce", "nll", "brier", "classwise_ece")}
        ts = results["temperature"]
        out |= {
            "temperature": ts["temperature"],
            "ece_before_ts": ts["before"]["ece"],  # on the held-out split, like the after figures
            "ece_after_ts": ts["after"]["ece"],
            "nll_before_ts": ts["before"]["nll"],
            "nll_after_ts": ts["after"]["nll"],
        }
        out["aurc"] = results["risk_coverage"]["aurc"]
    for ood_set, by_score in results["ood"].items():
        for score, f in by_score.items():
            out[f"auroc_{score}_{ood_set}"] = f["auroc"]  # no dots: a gate path's figure is its last part
            out[f"fpr95_{score}_{ood_set}"] = f["fpr95_id_positive"]
    for score in OOD_SCORES:  # per score over the OOD sets: one name for every modality (the default gates')
        aurocs = [by[score]["auroc"] for by in results["ood"].values() if score in by]
        out[f"auroc_{score}"] = sum(aurocs) / len(aurocs) if aurocs else Undefined(_no_score(score, results))
    for sigma, c in (results.get("smoothing") or {}).items():  # names without dots: σ and r in hundredths
        for r, acc in c["certified_accuracy"].items():
            out[f"certified_sigma{round(float(sigma) * 100)}_r{round(float(r) * 100)}"] = acc
    cs = results.get("corruption_scores")
    if not cs:
        out["mean_corruption_accuracy"] = Undefined("common corruptions are measured on image classifiers")
    else:
        out["mean_corruption_accuracy"] = cs["mean_corruption_accuracy"]
        for k in ("mce", "relative_mce"):
            if cs.get(k) is not None:
                out[f"corruption_{k}"] = cs[k]  # a variant's, relative to full precision
        for k, v in (results.get("corruption_scores_published") or {}).items():
            if k in ("mce", "relative_mce") and v is not None:
                out[f"corruption_{k}_published"] = v  # relative to reliability.baseline_errors
    return out
