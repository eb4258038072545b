"""Figures that can be undefined for an input: a number, or the reason there is none.

The mathematics returns `Undefined(reason)` in place of a figure it cannot give (a ratio whose denominator
is noise, a fit with too few points) instead of NaN; the stage splits its figures into the record's
`metrics` and `undefined`, and the report shows the reason where the number would be.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Undefined:
    """A figure with no value for this input, and why."""

    reason: str


Figure = float | Undefined


def is_number(v: Any) -> bool:
    """A finite real number (not None, NaN, infinity or Undefined)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _reason(v: Any) -> str:
    # A NaN or infinity without a reason is a gap upstream; it still never reaches `metrics`.
    return v.reason if isinstance(v, Undefined) else f"computed as {v} (no reason recorded)"


def split(figures: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, undefined) for a StageRecord: finite numbers in the first, reasons in the second."""
    metrics = {k: float(v) for k, v in figures.items() if is_number(v)}
    undefined = {k: _reason(v) for k, v in figures.items() if not is_number(v)}
    return metrics, undefined


def row(values: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-ready details row: each Undefined value becomes None and its reason goes under `undefined`
    (merged with any reasons the row already carries)."""
    out = {k: (None if isinstance(v, Undefined) else v) for k, v in values.items() if k != "undefined"}
    reasons = dict(values.get("undefined") or {})
    reasons |= {k: v.reason for k, v in values.items() if isinstance(v, Undefined)}
    out["undefined"] = reasons
    return out
