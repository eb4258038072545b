"""Why a figure is missing: the one line every view puts in `df.attrs["missing"]`, saying why a stage's
figures are absent from an audit and how to produce them; and a figure as a number or NaN."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from schemas.records import AuditRecord, StageRecord, StageStatus

from microscope.figures import is_number

# How to produce what a stage would have added (the `--stages` list and the config key involved).
HOW = {
    "ingest": "run the audit again: ingest failed, so nothing after it ran",
    "quantize": "add quantize to --stages and list the variants in quantize.formats (e.g. [int8, nf4])",
    "trace": "add trace to --stages (trace.layers and trace.hooks choose the points)",
    "sae": "add trace,sae to --stages and list the traced hooks in sae.hooks (e.g. blocks.1.hook_resid_post)",
    "metrics": "add metrics to --stages",
    "robustness": "add robustness to --stages (the robustness section configures the attacks)",
    "reliability": "add reliability to --stages (the reliability section sets samples, OOD sets and corruptions)",
    "landscape": "add landscape to --stages (the landscape section sets the loss subset, grid and eigenvalues)",
    "attribution": "add attribution to --stages (the attribution section sets samples, IG steps and SmoothGrad)",
    "report": "add report to --stages",
}


def why_missing(record: AuditRecord, stage: str) -> str | None:
    """None when `stage` finished (completed, cached or partial); else one line: why, and how to get it."""
    rec = record.stages.get(stage)
    if rec is None or rec.status == StageStatus.skipped:
        reason = rec.details.get("reason", "not run") if rec else "not in this audit's record"
        return f"{stage} did not run in audit {record.audit_id} ({reason}): {HOW[stage]}"
    if rec.status == StageStatus.failed:
        return (
            f"{stage} failed in audit {record.audit_id}: {rec.error or 'no error recorded'} "
            f"(traceback: audits/{record.audit_id}/{stage}.log in the store); fix it and run the audit again"
        )
    return None


def variant_why_missing(record: AuditRecord, stage: str) -> dict[str, str]:
    """`stage[v]` → reason for each variant whose `stage` failed."""
    return {
        f"{stage}[{v}]": f"{stage}[{v}] failed: {r.error or 'no error recorded'} "
        f"(traceback: audits/{record.audit_id}/{stage}[{v}].log in the store)"
        for v, recs in sorted(record.variants.items())
        if (r := recs.get(stage)) is not None and r.status == StageStatus.failed
    }


def number(v: Any) -> float:
    """The figure as a float, NaN where it is not a number."""
    return float(v) if is_number(v) else math.nan


def finished_by_variant(
    stage: str, fp: StageRecord | None, variants: Mapping[str, Mapping[str, StageRecord]], holds: str
) -> dict[str, StageRecord]:
    """A per-variant stage's finished records (not failed or skipped, with `holds` in their details): full
    precision's first (`fp`), then each variant's by name."""
    out = {"fp": fp} if fp is not None else {}
    out |= {v: recs[stage] for v, recs in sorted(variants.items()) if stage in recs}
    return {
        k: r
        for k, r in out.items()
        if r.status not in (StageStatus.failed, StageStatus.skipped) and r.details.get(holds) is not None
    }
