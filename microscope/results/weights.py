"""The metrics stage's figures as recorded: weight rows, curvature per tensor and per block, CKA."""

from __future__ import annotations

import math
from typing import Any

from schemas.hooks import matrix_role
from schemas.records import StageRecord, StageStatus


def weight_figures(metrics: StageRecord | None) -> dict[str, Any] | None:
    """What the metrics record holds (None when it failed or measured no weight): `weights` (one row per
    2-D weight as recorded: `name`, `layer`, `flags`, `alpha`, `esd`, `spectrum`, ...), `sensitivity` (one
    row per tensor), `cka` (`cka_summary`), `fisher_maps`, `fisher_key`. Takes the stage record: the report
    reads it while the audit runs, before an audit record exists; `layer_table` is the joined table."""
    if metrics is None or metrics.status == StageStatus.failed or not metrics.details.get("weights"):
        return None
    d = metrics.details
    return {
        "weights": d["weights"],
        "sensitivity": d.get("sensitivity") or [],
        "cka": cka_summary(d.get("cka") or {}),
        "fisher_maps": d.get("fisher_maps") or [],
        "fisher_key": d.get("fisher_key") or "",
    }


def cka_summary(cka: dict[str, Any]) -> dict[str, Any]:
    """The recorded CKA: `matrix` over `layers` (traced points), `variants` (fp against each variant, per
    hook), `audits` (against other audits, per hook), `hooks` (those compared across audits), `skipped`."""
    audits = cka.get("audits", {})
    return {
        "matrix": cka.get("matrix"),
        "layers": cka.get("layers"),
        "variants": cka.get("variants", {}),
        "audits": audits,
        "hooks": sorted({h for v in audits.values() for h in v}),
        "skipped": cka.get("skipped", {}),
    }


def sensitivity_by_block(sens: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per-tensor sensitivity summed per block (norms and standard errors in quadrature), by block."""
    blocks: dict[int, dict[str, float]] = {}
    for b in sens:
        if b["layer"] < 0:
            continue
        agg = blocks.setdefault(
            b["layer"],
            {"layer": b["layer"], "grad_norm": 0.0, "fisher_trace": 0.0, "hessian_trace": 0.0, "hessian_trace_se": 0.0},
        )
        agg["grad_norm"] = math.hypot(agg["grad_norm"], b["grad_norm"])
        agg["fisher_trace"] += b["fisher_trace"]
        agg["hessian_trace"] += b["hessian_trace"]
        agg["hessian_trace_se"] = math.hypot(agg["hessian_trace_se"], b["hessian_trace_se"])
    return [blocks[k] for k in sorted(blocks)]


def fisher_by_block(sens: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """log10 Fisher trace per block and matrix role ({layer: {role: value}}), tensors with a positive trace
    inside the blocks only."""
    table: dict[int, dict[str, float]] = {}
    for r in sens:
        if r["layer"] >= 0 and r["fisher_trace"] > 0:
            table.setdefault(r["layer"], {})[matrix_role(r["name"])] = math.log10(r["fisher_trace"])
    return table


def randomized_spectra(weights: list[dict[str, Any]]) -> dict[str, Any]:
    """The matrices whose spectrum took the randomized path: `count`, the largest `rank` computed and the
    largest `error` bound recorded (0 without any)."""
    rand = [r for r in weights if r.get("spectrum") == "randomized"]
    return {
        "count": len(rand),
        "rank": max((r["n_singular_values"] for r in rand), default=0),
        "error": max((r["spectrum_error"] for r in rand), default=0.0),
    }
