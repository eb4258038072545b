"""The loss landscape: top Hessian eigenvalues and their layer composition, 1-D and 2-D loss slices and
sharpness, for full precision and each variant, and the run's curvature against training step. Functions take
the stage records (as the reliability ones do) so the report can read them before the audit record exists.
The figures are diagnostics: compare checkpoints of one run or a model with its variants, not across models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from schemas.records import AuditRecord, StageRecord, StageStatus

from microscope import glossary
from microscope.results.missing import HOW, finished_by_variant, variant_why_missing, why_missing

if TYPE_CHECKING:
    import pandas as pd

HOW_LANDSCAPE = "add landscape to --stages (the landscape section sets samples, eigenvalues, grid, span and sharpness)"
HISTORY_FIGURES = ("loss", "lambda_max", "eps_sharpness", "rho_sharpness", "slice_1d_curvature")
# one sentence per figure, from the glossary the report and the viewer's tables share
MEANING = {name: glossary.TERMS[name].help for name in (*HISTORY_FIGURES, "lipschitz_upper", "jacobian_norm")}


def why_landscape_missing(record: AuditRecord) -> dict[str, str]:
    """`landscape` (and `landscape[v]` per failed variant) → one line: why it is absent and how to get it."""
    missing: dict[str, str] = {}
    rec = record.stages.get("landscape")
    if rec is None or rec.status == StageStatus.skipped:
        reason = rec.details.get("reason", "not run") if rec else "not in this audit's record"
        missing["landscape"] = (
            f"landscape did not run in audit {record.audit_id} ({reason}): {HOW.get('landscape', HOW_LANDSCAPE)}"
        )
    elif (why := why_missing(record, "landscape")) is not None:
        missing["landscape"] = why
    return missing | variant_why_missing(record, "landscape")


def landscape_by_variant(
    fp: StageRecord | None, variants: Mapping[str, Mapping[str, StageRecord]]
) -> dict[str, StageRecord]:
    """The finished landscape records: full precision's first (`fp`), then each variant's by name."""
    return finished_by_variant("landscape", fp, variants, "figures")


def landscape_overview(
    fp: StageRecord | None, variants: Mapping[str, Mapping[str, StageRecord]]
) -> dict[str, Any] | None:
    """What the landscape records say as a whole (None unless full precision's finished): `records` (as
    `landscape_by_variant`), `figures` ({variant: {figure: value}}), `undefined` ({variant: {figure: why}}),
    and from full precision's record `samples`, `kind`, `eigen` (as recorded), `sharpness` (its settings and
    label), `seconds`, `note` (the diagnostics note) and `meaning` (one sentence per figure)."""
    recs = landscape_by_variant(fp, variants)
    if "fp" not in recs:
        return None
    d = recs["fp"].details
    return {
        "records": recs,
        "figures": {v: dict(r.details["figures"]) for v, r in recs.items()},
        "undefined": {v: dict(r.details.get("undefined") or {}) for v, r in recs.items()},
        "samples": d.get("samples"),
        "kind": d.get("kind"),
        "reason": d.get("reason"),
        "eigen": d.get("eigen") or [],
        "sharpness": d.get("sharpness") or {},
        "seconds": d.get("seconds") or {},
        "note": d.get("diagnostics_note", ""),
        "meaning": MEANING,
    }


def figures_table(records: Mapping[str, StageRecord]) -> pd.DataFrame:
    """One row per variant: every landscape figure (NaN where undefined)."""
    import pandas as pd

    return pd.DataFrame([{"variant": v, **r.details["figures"]} for v, r in records.items()])


def slice_1d_frame(records: Mapping[str, StageRecord]) -> pd.DataFrame:
    """The 1-D slices in long form: variant, alpha, loss (None → NaN where the loss was not finite)."""
    import pandas as pd

    rows = [
        {"variant": v, "alpha": a, "loss": loss}
        for v, r in records.items()
        if (s := r.details.get("slice_1d"))
        for a, loss in zip(s["alphas"], s["loss"], strict=True)
    ]
    return pd.DataFrame(rows, columns=["variant", "alpha", "loss"]).astype({"loss": float})


def slice_2d_frame(record: StageRecord | None) -> pd.DataFrame:
    """One record's 2-D slice in long form: alpha, beta, loss (empty when there is none)."""
    import pandas as pd

    s = (record.details.get("slice_2d") if record is not None else None) or {}
    rows = [
        {"alpha": a, "beta": b, "loss": loss}
        for a, row in zip(s.get("alphas", []), s.get("loss", []), strict=True)
        for b, loss in zip(s["betas"], row, strict=True)
    ]
    return pd.DataFrame(rows, columns=["alpha", "beta", "loss"]).astype({"loss": float})


def eigen_table(record: StageRecord | None, top: int = 3) -> pd.DataFrame:
    """One row per Hessian eigenvalue: rank, eigenvalue, converged, iterations and `top_blocks` (the `top`
    blocks holding most of its eigenvector, "block share" joined; empty where not recorded)."""
    import pandas as pd

    rows = []
    for i, e in enumerate((record.details.get("eigen") if record is not None else None) or []):
        comp = e.get("composition") or {}
        best = sorted(comp.items(), key=lambda kv: -kv[1])[:top]
        rows.append({"rank": i + 1, "eigenvalue": e["eigenvalue"], "converged": e["converged"],
                     "iterations": e["iterations"], "top_blocks": ", ".join(f"{b} {s:.0%}" for b, s in best)})  # fmt: skip
    return pd.DataFrame(rows, columns=["rank", "eigenvalue", "converged", "iterations", "top_blocks"])


def composition_frame(record: StageRecord | None) -> pd.DataFrame:
    """The eigenvectors' composition in long form: rank, block, share (only where recorded)."""
    import pandas as pd

    rows = [
        {"rank": i + 1, "block": b, "share": s}
        for i, e in enumerate((record.details.get("eigen") if record is not None else None) or [])
        for b, s in (e.get("composition") or {}).items()
    ]
    return pd.DataFrame(rows, columns=["rank", "block", "share"])


def landscape_history(records: Sequence[AuditRecord]) -> pd.DataFrame:
    """A run's audits in step order, one row per audit with a finished full-precision landscape record:
    `audit_id`, `step` and every figure of its `figures` (HISTORY_FIGURES first; NaN where undefined).
    Audits without a step are left out; `attrs["missing"]` says how many lack a landscape record and why
    the first one does."""
    import pandas as pd

    rows, lacking = [], []
    for r in sorted(records, key=lambda r: (r.step is None, r.step or 0, r.created_at)):
        rec = landscape_by_variant(r.stages.get("landscape"), {}).get("fp")
        if rec is None:
            lacking.append(why_landscape_missing(r).get("landscape", "no figures recorded"))
        elif r.step is not None:
            rows.append({"audit_id": r.audit_id, "step": r.step, **rec.details["figures"]})
    df = pd.DataFrame(rows)
    cols = ["audit_id", "step", *HISTORY_FIGURES]
    df = df.reindex(columns=cols + [c for c in df.columns if c not in cols])
    df.attrs["missing"] = (
        {"landscape": f"{len(lacking)} of {len(records)} audits lack it; the first: {lacking[0]}"} if lacking else {}
    )
    return df
