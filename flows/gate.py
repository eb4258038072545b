"""The gate stage: judge the audit against its rules and baseline (`microscope.gates`), then tell everyone:
the record (a `gate` stage whose details are the verdict), MLflow (tags and one metric per rule), the
Prefect UI (a markdown artifact) and Prefect events (`microscope.gate.failed` / `.passed`, which the
automation `make deploy` registers turns into a notification). The callback URL gets the verdict with
the audit's result (`result_callback.result_payload`)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.settle import one_line
from microscope import gates, tracking
from schemas.gates import GateVerdict
from schemas.records import StageRecord, StageStatus

if TYPE_CHECKING:
    from flows.tracker import AuditTracker

EVENT_FAILED, EVENT_PASSED = "microscope.gate.failed", "microscope.gate.passed"


def audit_resource(verdict: GateVerdict) -> dict[str, str]:
    """The audit as a Prefect event resource: its labels are what automations filter on."""
    return {
        "prefect.resource.id": f"microscope.audit.{verdict.audit_id}",
        "prefect.resource.name": verdict.audit_id,
        "microscope.audit_id": verdict.audit_id,
        "microscope.run_id": verdict.run_id or "",
        "microscope.step": "" if verdict.step is None else str(verdict.step),
        "microscope.verdict": verdict.verdict,
    }


def event_payload(verdict: GateVerdict, report_uri: str | None = None) -> dict[str, Any]:
    broke = verdict.failed or verdict.warned
    return {
        "verdict": verdict.verdict,
        "summary": verdict.summary(),
        "baseline_audit_id": verdict.baseline_audit_id,
        "failed": [r.rule for r in verdict.failed],
        "warned": [r.rule for r in verdict.warned],
        "offenders": {r.rule: [o.key for o in r.offenders[:5]] for r in broke},
        "report": report_uri,
    }


def emit(verdict: GateVerdict, flow_run_id: str | None, report_uri: str | None = None) -> None:
    from prefect.events import emit_event

    related = (
        [{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}]
        if flow_run_id
        else []
    )
    emit_event(
        event=EVENT_FAILED if verdict.verdict == "fail" else EVENT_PASSED,
        resource=audit_resource(verdict),
        related=related,
        payload=event_payload(verdict, report_uri),
    )


def run_gate(t: AuditTracker) -> GateVerdict | None:
    """Judge `t`'s audit (its rules from `gate.rules`) and record the verdict (record, MLflow, artifact);
    the caller emits the event once the report exists. A rule that cannot be applied (an unknown path)
    fails the stage with its one-line reason, never the other stages."""
    cfg = t.config.gate
    started, t0 = datetime.now(UTC), time.perf_counter()
    try:
        rules, source = gates.load_rules(cfg.rules)
        verdict = gates.judge(t.store, t.rec, rules, baseline=cfg.baseline, source=source, wait_s=cfg.wait_previous_s)
    except gates.GateError as exc:
        t.stage(StageRecord(stage="gate", status=StageStatus.failed, error=one_line(exc), started_at=started), "")
        return None
    r = gates.stage_record(verdict, started, time.perf_counter() - t0)
    t.stage(r, "")
    log = get_run_logger()
    log.info("%s", verdict.summary())
    try:
        tracking.log_gate(t.rec.mlflow_run_id, verdict)
    except Exception as exc:  # noqa: BLE001 -- the verdict is in the record; MLflow is one more place
        log.warning("gate verdict not logged to MLflow: %s", one_line(exc))
    create_markdown_artifact(
        key="gate", markdown=gates.markdown(verdict), description=f"Gate of audit {verdict.audit_id}"
    )
    return verdict
