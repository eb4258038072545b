"""Attribution: which inputs drive the model's decisions (saliency, integrated gradients, SmoothGrad maps;
per-token scores for text), whether the maps pass the completeness and randomisation checks, and through
which blocks the decisions flow, joined with the blocks' Fisher and Hutchinson traces. Functions take the
stage records (as the reliability ones do) so the report can read them before the audit record exists."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from schemas.records import AuditRecord, StageRecord, StageStatus

from microscope.results.missing import HOW, finished_by_variant, variant_why_missing, why_missing

if TYPE_CHECKING:
    import pandas as pd

    from microscope.store import ArtifactStore

HOW_ATTRIBUTION = "add attribution to --stages (the attribution section sets samples, ig_steps and the baseline)"


def attribution_by_variant(
    fp: StageRecord | None, variants: Mapping[str, Mapping[str, StageRecord]]
) -> dict[str, StageRecord]:
    """The finished attribution records: full precision's first (`fp`), then each variant's by name."""
    return finished_by_variant("attribution", fp, variants, "kind")


def attribution_overview(
    fp: StageRecord | None, variants: Mapping[str, Mapping[str, StageRecord]]
) -> dict[str, Any] | None:
    """What the attribution records say (None unless full precision's finished): `records` (as
    `attribution_by_variant`), and from full precision's details `kind`, `samples`, `methods`, `figures`,
    `layer_shares` (largest first), `randomisation`, `undefined` and `per_sample` (without maps); `variants`
    ([{variant, figure...}] for every finished record, full precision first)."""
    recs = attribution_by_variant(fp, variants)
    if "fp" not in recs:
        return None
    d = recs["fp"].details
    return {
        "records": recs,
        "kind": d["kind"],
        "samples": d.get("samples", []),
        "methods": d.get("methods", {}),
        "figures": d.get("figures", {}),
        "layer_shares": dict(sorted(d.get("layer_shares", {}).items(), key=lambda kv: -kv[1])),
        "randomisation": d.get("randomisation"),
        "undefined": d.get("undefined", {}),
        "per_sample": d.get("per_sample", []),
        "variants": [{"variant": v, **r.details.get("figures", {})} for v, r in recs.items()],
    }


def attribution_missing(record: AuditRecord) -> dict[str, str]:
    """{part: why it is missing and how to produce it} for the attribution stage and its variants."""
    missing: dict[str, str] = {}
    if "attribution" in HOW:
        why = why_missing(record, "attribution")
    else:  # the shared table lacks the stage: the same sentence with its own hint
        rec = record.stages.get("attribution")
        why = None
        if rec is None or rec.status == StageStatus.skipped:
            reason = rec.details.get("reason", "not run") if rec else "not in this audit's record"
            why = f"attribution did not run in audit {record.audit_id} ({reason}): {HOW_ATTRIBUTION}"
        elif rec.status == StageStatus.failed:
            why = (
                f"attribution failed in audit {record.audit_id}: {rec.error or 'no error recorded'} "
                f"(traceback: audits/{record.audit_id}/attribution.log in the store); fix it and run the audit again"
            )
    if why is not None:
        missing["attribution"] = why
    return missing | variant_why_missing(record, "attribution")


def _key(store: ArtifactStore, uri: str) -> str:
    """The store key of an artifact URI (records hold URIs; the store reads keys)."""
    root = store.uri_for("x")[:-1]
    return uri[len(root) :] if uri.startswith(root) else uri


def attribution_results(store: ArtifactStore, record: StageRecord | None) -> dict[str, Any] | None:
    """The full results.json of an attribution record (maps, per-token lists), None without one."""
    if record is None or "results" not in record.artifacts:
        return None
    return store.get_json(_key(store, record.artifacts["results"]))


def _block_rows(block: str, rows: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], str]:
    """The sensitivity rows of a block: its parameters by name prefix, else (a name ending in `.<int>`, e.g. a
    hook path's block) those whose block index is that integer."""
    by_prefix = [r for r in rows if str(r["name"]).startswith(block + ".")]
    if by_prefix:
        return by_prefix, "parameter prefix"
    m = re.search(r"\.(\d+)$", block)
    if m:
        return [r for r in rows if int(r.get("layer", -1)) == int(m.group(1))], "block index"
    return [], "no match"


def _finite_sum(rows: Sequence[Mapping[str, Any]], column: str) -> float:
    vals = [float(r[column]) for r in rows if r.get(column) is not None and math.isfinite(float(r[column]))]
    return math.fsum(vals) if vals else math.nan


def layer_shares_table(
    record: StageRecord | None, sensitivity_rows: Sequence[Mapping[str, Any]] | None
) -> pd.DataFrame:
    """One row per attributed block: its attribution share, and the Fisher trace and Hutchinson Hessian trace
    summed over its parameters (the metrics stage's sensitivity rows; NaN traces, e.g. a tied matrix, are
    left out), each also as a percentage of its column's total over the table's blocks: are the sensitive
    blocks the ones the decisions flow through? Columns: block, attribution_pct, fisher_trace, fisher_pct,
    hessian_trace, hessian_pct, parameters (rows matched), matched_by."""
    import pandas as pd

    shares = (record.details.get("layer_shares") or {}) if record is not None else {}
    rows = list(sensitivity_rows or [])
    table = []
    for block, share in shares.items():
        matched, how = _block_rows(block, rows)
        table.append({
            "block": block, "attribution_share": float(share),
            "fisher_trace": _finite_sum(matched, "fisher_trace"), "hessian_trace": _finite_sum(matched, "hessian_trace"),
            "parameters": len(matched), "matched_by": how,
        })  # fmt: skip
    df = pd.DataFrame(
        table,
        columns=["block", "attribution_share", "fisher_trace", "hessian_trace", "parameters", "matched_by"],
    )
    for col, pct in (("attribution_share", "attribution_pct"), ("fisher_trace", "fisher_pct"), ("hessian_trace", "hessian_pct")):  # fmt: skip
        total = df[col].sum(skipna=True)
        df[pct] = 100.0 * df[col] / total if len(df) and total != 0 and math.isfinite(total) else math.nan
    order = ["block", "attribution_pct", "fisher_trace", "fisher_pct", "hessian_trace", "hessian_pct", "parameters", "matched_by"]  # fmt: skip
    df = df[order]
    if not rows:
        df.attrs["missing"] = {"metrics.sensitivity": "no Fisher/Hutchinson figures: set metrics.sensitivity: true"}
    return df
