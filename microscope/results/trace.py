"""The traced points: what the trace stage recorded per (layer, hook) dataset."""

from __future__ import annotations

from typing import Any

from schemas.records import StageRecord


def trace_points(trace: StageRecord | None) -> tuple[list[dict[str, Any]], str]:
    """The trace record's datasets, one per traced point, by layer then hook: `layer`, `hook`, `module`,
    `d`, `rows` and `stats` (`mean_norm`, `max_norm`, `near_zero_frac`, ...) as recorded; and the store
    prefix they live under. Empty without a trace. Takes the stage record: the report reads it while the
    audit runs, before an audit record exists."""
    if trace is None or not trace.details.get("datasets"):
        return [], ""
    rows = sorted(trace.details["datasets"].values(), key=lambda r: (r["layer"], r["hook"]))
    return rows, trace.details.get("prefix", "")
