"""The gate: the verdict an audit recorded, and a run's verdicts by step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from schemas.gates import GateVerdict
from schemas.records import AuditRecord, StageRecord, StageStatus

from microscope import audits
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import pandas as pd


def gate_verdict(record: AuditRecord) -> GateVerdict | None:
    """The verdict the audit's gate stage recorded (None without one: no `gate.rules`, or it failed)."""
    return stage_verdict(record.stages.get("gate"))


def stage_verdict(gate: StageRecord | None) -> GateVerdict | None:
    """The verdict a gate stage record holds (its details), None when it holds none. Takes the record
    itself: the report reads it while the audit runs, before an audit record exists."""
    if (
        gate is None
        or gate.status not in (StageStatus.completed, StageStatus.cached)
        or not gate.details.get("results")
    ):
        return None
    return GateVerdict.model_validate(gate.details)


def gate_history(store: ArtifactStore, run_id: str) -> pd.DataFrame:
    """Every gated audit of a run, long form: `step`, `audit_id`, `rule`, `outcome`, `compared`, `offenders`
    (the first five keys), in step order; `attrs["first_failed"]`: rule -> the first step it failed at."""
    import pandas as pd

    rows = []
    for rec in audits.list_all(store, run_id=run_id):
        v = gate_verdict(rec)
        if v is None or rec.step is None:
            continue
        rows += [
            {
                "step": rec.step,
                "audit_id": rec.audit_id,
                "rule": r.rule,
                "outcome": r.outcome,
                "compared": r.compared,
                "offenders": ", ".join(o.key for o in r.offenders[:5]),
            }
            for r in v.results
        ]
    df = pd.DataFrame(rows, columns=["step", "audit_id", "rule", "outcome", "compared", "offenders"])
    df = df.sort_values(["step", "rule"], kind="stable").reset_index(drop=True)
    failed = df[df["outcome"] == "fail"]
    df.attrs["first_failed"] = {str(r): int(g["step"].min()) for r, g in failed.groupby("rule")}
    return df
