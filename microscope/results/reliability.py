"""Reliability: calibration (before and after temperature scaling), OOD detection per score and shifted set,
and common corruptions, for full precision and each variant. Functions take the stage records (as the
robustness ones do) so the report can read them before the audit record exists."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from schemas.records import AuditRecord, StageRecord

from microscope.results.missing import finished_by_variant, variant_why_missing, why_missing

if TYPE_CHECKING:
    import pandas as pd

HEADLINE = (
    "accuracy", "ece", "ece_before_ts", "ece_after_ts", "temperature", "nll", "nll_before_ts", "nll_after_ts",
    "brier", "aurc",
)  # fmt: skip


def reliability_by_variant(
    fp: StageRecord | None, variants: Mapping[str, Mapping[str, StageRecord]]
) -> dict[str, StageRecord]:
    """The finished reliability records: full precision's first (`fp`), then each variant's by name."""
    return finished_by_variant("reliability", fp, variants, "ood")


def reliability_overview(
    fp: StageRecord | None, variants: Mapping[str, Mapping[str, StageRecord]]
) -> dict[str, Any] | None:
    """What the reliability records say as a whole (None unless full precision's finished): `records` (as
    `reliability_by_variant`) and, from full precision's record, `samples`, `binning` (or why there is no
    calibration), `ood` ([{set, score, auroc, ...}]), `severities`, `corruptions` ([{name, acc per severity}]),
    `clean_accuracy` and `corruption_samples` of the corrupted images, `smoothing` ([{sigma, ...}]) and its
    `bound`. Takes the stage records: the report reads them before the audit record exists."""
    recs = reliability_by_variant(fp, variants)
    if "fp" not in recs:
        return None
    d = recs["fp"].details
    corr = d.get("corruptions") or {}
    severities = sorted({int(s) for by in corr.get("accuracy", {}).values() for s in by})
    smoothing = [{"sigma": s, **c} for s, c in (d.get("smoothing") or {}).items()]
    return {
        "records": recs,
        "samples": d["n"],
        "binning": (d.get("calibration") or {}).get("binning") or d.get("calibration_undefined", ""),
        "ood": [{"set": s, "score": score, **f} for s, by_score in d["ood"].items() for score, f in by_score.items()],
        "severities": severities,
        "corruptions": [
            {"name": name, "acc": [by.get(str(s)) for s in severities]} for name, by in corr.get("accuracy", {}).items()
        ],
        "clean_accuracy": corr.get("clean_accuracy"),
        "corruption_samples": corr.get("n"),
        "smoothing": smoothing,
        "bound": smoothing[0]["bound"] if smoothing else None,
    }


def _records(record: AuditRecord) -> tuple[dict[str, StageRecord], dict[str, str]]:
    missing: dict[str, str] = {}
    if (why := why_missing(record, "reliability")) is not None:
        missing["reliability"] = why
    missing |= variant_why_missing(record, "reliability")
    return reliability_by_variant(record.stages.get("reliability"), record.variants), missing


def reliability_table(record: AuditRecord) -> pd.DataFrame:
    """One row per variant: samples, accuracy, ECE before and after temperature scaling, the temperature,
    NLL, Brier, AURC, and the mean corruption accuracy (images); `attrs["missing"]` says what is absent."""
    import pandas as pd

    recs, missing = _records(record)
    rows = []
    for v, r in recs.items():
        row: dict[str, Any] = {"variant": v, "samples": int(r.metrics.get("samples", 0))}
        row |= {k: r.metrics.get(k) for k in HEADLINE}
        row["mean_corruption_accuracy"] = r.metrics.get("mean_corruption_accuracy")
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["missing"] = missing
    return df


def reliability_diagram(record: AuditRecord) -> pd.DataFrame:
    """Per variant and equal-width bin: accuracy, confidence and count over all samples ("uncalibrated"), and
    over the evaluation split before and after temperature scaling."""
    import pandas as pd

    rows = []
    for v, r in _records(record)[0].items():
        d = r.details
        views = {"all samples": d.get("calibration")}
        if d.get("temperature"):
            views |= {"held-out, before T": d["temperature"]["before"], "held-out, after T": d["temperature"]["after"]}
        for view, figs in views.items():
            if not figs:
                continue
            g = figs["diagram"]
            for i in range(len(g["count"])):
                rows.append({"variant": v, "view": view, "bin_lower": g["bin_lower"][i], "bin_upper": g["bin_upper"][i],
                             "accuracy": g["accuracy"][i], "confidence": g["confidence"][i], "count": g["count"][i]})  # fmt: skip
    return pd.DataFrame(rows)


def ood_table(record: AuditRecord) -> pd.DataFrame:
    """One row per variant, OOD set and score: AUROC, AUPR in and out, FPR at 95% TPR both ways."""
    import pandas as pd

    rows = []
    for v, r in _records(record)[0].items():
        for ood_set, by_score in r.details["ood"].items():
            for score, f in by_score.items():
                rows.append({"variant": v, "ood_set": ood_set, "score": score, "auroc": f["auroc"],
                             "aupr_in": f["aupr_in"], "aupr_out": f["aupr_out"],
                             "fpr95_id_positive": f["fpr95_id_positive"], "fpr95_ood_positive": f["fpr95_ood_positive"],
                             "n_in": f["n_in"], "n_out": f["n_out"]})  # fmt: skip
    return pd.DataFrame(rows)


def roc_points(record: AuditRecord, variant: str = "fp") -> pd.DataFrame:
    """The ROC curves (in-distribution positive) of one variant, per OOD set and score."""
    import pandas as pd

    r = _records(record)[0].get(variant)
    rows = []
    if r is not None:
        for ood_set, by_score in r.details["ood"].items():
            for score, f in by_score.items():
                rows += [{"ood_set": ood_set, "score": score, "fpr": x, "tpr": y} for x, y in zip(f["roc"]["fpr"], f["roc"]["tpr"], strict=True)]  # fmt: skip
    return pd.DataFrame(rows)


def corruption_table(record: AuditRecord) -> pd.DataFrame:
    """Accuracy per variant, corruption and severity (image classifiers), with the clean accuracy."""
    import pandas as pd

    rows = []
    for v, r in _records(record)[0].items():
        c = r.details.get("corruptions")
        if not c:
            continue
        for name, by_sev in c["accuracy"].items():
            rows += [{"variant": v, "corruption": name, "severity": int(s), "accuracy": a, "clean_accuracy": c["clean_accuracy"]} for s, a in by_sev.items()]  # fmt: skip
    return pd.DataFrame(rows)


def smoothing_table(record: AuditRecord) -> pd.DataFrame:
    """Per variant and σ: images certified, abstentions and the certified accuracy at each radius."""
    import pandas as pd

    rows = []
    for v, r in _records(record)[0].items():
        for sigma, c in (r.details.get("smoothing") or {}).items():
            row = {"variant": v, "sigma": float(sigma), "images": c["samples"], "abstained": c["abstained"]}
            rows.append(row | {f"r={k}": a for k, a in c["certified_accuracy"].items()})
    return pd.DataFrame(rows)
