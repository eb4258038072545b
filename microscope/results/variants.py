"""The quantized variants: their fidelity and memory, and their activation drift per traced point."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from schemas.hooks import hook_parts
from schemas.records import AuditRecord, StageRecord

from microscope.results.missing import HOW, number, why_missing

if TYPE_CHECKING:
    import pandas as pd

QUANT_FIGURES = ("kl_mean", "kl_p99", "top1_agreement", "delta_ppl", "ppl_fp", "ppl_q", "accuracy_fp", "accuracy_q")


def quantization_table(record: AuditRecord) -> pd.DataFrame:
    """One row per quantized variant: `variant`, `status`, `requested`, `produced`, `fell_back`, the
    fidelity figures the stage recorded (KL, top-1 agreement, Δ perplexity, or accuracy for classifiers;
    each column present only where some variant has it, undefined ones NaN with their reasons in
    `attrs["undefined"]`), memory (`measured_bytes`, `fp_bytes`, `memory_ratio`), `most_drifting_hook`
    and `error`. `attrs["missing"]` says why there is no variant."""
    import pandas as pd

    missing: dict[str, str] = {}
    if (why := why_missing(record, "quantize")) is not None:
        missing["quantize"] = why
    elif not record.variants:
        missing["quantize"] = f"quantize made no variant: {HOW['quantize']}"
    undefined: dict[str, dict[str, str]] = {}
    rows = []
    for q in variant_summaries(dict(sorted(record.variants.items()))):
        v = q["variant"]
        row: dict[str, Any] = {
            "variant": v,
            "status": q["status"],
            "requested": q["requested"],
            "produced": q["produced"],
            "fell_back": bool(q["fell_back"]),
        }
        row |= {k: float(x) for k, x in q["metrics"].items() if k not in ("estimated_bytes", "on_disk_bytes")}
        if row.get("fp_bytes") and row.get("measured_bytes"):
            row["memory_ratio"] = row["measured_bytes"] / row["fp_bytes"]
        row["most_drifting_hook"] = q["most_drifting_hook"]
        row["error"] = q["error"]
        if q["undefined"]:
            undefined[v] = dict(q["undefined"])
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["missing"] = missing
    df.attrs["undefined"] = undefined
    return df


def drift_table(record: AuditRecord) -> pd.DataFrame:
    """Activation drift of each variant against full precision, per traced point: `variant`, `hook`,
    `layer`, `kind` (resid | mlp | attn), `cosine`, `rel_error`; sorted by variant and layer."""
    import pandas as pd

    rows = [
        p | {"cosine": number(p["cosine"]), "rel_error": number(p["rel_error"])}
        for p in drift_points(dict(sorted(record.variants.items())))
    ]
    df = pd.DataFrame(rows, columns=["variant", "hook", "layer", "kind", "cosine", "rel_error"])
    return df.sort_values(["variant", "layer", "kind"], kind="stable").reset_index(drop=True)


def variant_summaries(variants: Mapping[str, Mapping[str, StageRecord]]) -> list[dict[str, Any]]:
    """What each variant's quantize record says, in the given order (variants without one left out):
    `variant`, `status`, `error`, `requested`, `produced`, `fell_back`, `eval_tokens`, `most_drifting_hook`,
    `metrics`, `undefined` (the record's own dicts), values as recorded. Takes the per-variant records: the
    report reads them while the audit runs, before an audit record exists."""
    out = []
    for v, recs in variants.items():
        q = recs.get("quantize")
        if q is None:
            continue
        d = q.details
        out.append(
            {
                "variant": v,
                "status": q.status.value,
                "error": q.error,
                "requested": d.get("requested", v),
                "produced": d.get("produced"),
                "fell_back": d.get("fell_back"),
                "eval_tokens": d.get("eval_tokens", 0),
                "most_drifting_hook": d.get("most_drifting_hook"),
                "metrics": q.metrics,
                "undefined": q.undefined,
            }
        )
    return out


def drift_points(variants: Mapping[str, Mapping[str, StageRecord]]) -> list[dict[str, Any]]:
    """Activation drift per (variant, traced point) in the records' order: `variant`, `hook`, `layer`,
    `kind`, `cosine`, `rel_error` (as recorded; `drift_table` is the sorted, NaN-filled table)."""
    rows = []
    for v, recs in variants.items():
        q = recs.get("quantize")
        for hook_name, d in ((q.details.get("drift") or {}) if q else {}).items():
            layer, kind = hook_parts(hook_name)
            rows.append(
                {
                    "variant": v,
                    "hook": hook_name,
                    "layer": layer,
                    "kind": kind,
                    "cosine": d.get("cosine"),
                    "rel_error": d.get("rel_error"),
                }
            )
    return rows
