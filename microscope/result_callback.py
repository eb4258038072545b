"""The audit's result, POSTed to the training job's `callback_url` when the audit ends, signed the same way
as the deliveries (Standard Webhooks, the first of MICROSCOPE_WEBHOOK_SECRET), retried with backoff for
a bounded time. A callback that cannot be delivered is a warning on the audit, never a failed audit."""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

from schemas.records import AuditRecord, StageStatus

from microscope import audits

log = logging.getLogger("microscope.callback")
EVENT = "microscope.audit.finished"


def result_payload(rec: AuditRecord, checkpoint: str, flow_run_id: str | None) -> dict[str, Any]:
    return {
        "event": EVENT,
        "audit_id": rec.audit_id,
        "flow_run_id": flow_run_id,
        "checkpoint": checkpoint,
        "run_id": rec.run_id,
        "step": rec.step,
        "status": rec.status.value,
        "error": rec.error,
        "report": rec.report_uri,
        "figures": audits.headline(rec),
        "gate": gate_of(rec),
    }


def gate_of(rec: AuditRecord) -> dict[str, Any] | None:
    """The gate's verdict (the record's `gate` stage) when the audit has rules; None otherwise."""
    g = rec.stages.get("gate")
    if g is None or g.status == StageStatus.skipped:
        return None
    if g.status == StageStatus.failed:
        return {"verdict": "error", "error": g.error}
    return g.details


def failed_payload(head: dict[str, Any], checkpoint: str, flow_run_id: str | None, error: str) -> dict[str, Any]:
    """An audit refused before it started (a bad config, a missing checkpoint): no record, the reason."""
    base = {"event": EVENT, "flow_run_id": flow_run_id, "checkpoint": checkpoint, **head}
    return base | {"status": "failed", "error": error, "report": None, "figures": {}, "gate": None}


def post_result(url: str, payload: dict[str, Any], secret: str, give_up_after_s: float = 120.0) -> str | None:
    """POST `payload` signed; None once a 2xx answers, else why it was given up (one line)."""
    import httpx

    from microscope.integrations.notify import new_message_id, signed_headers

    body = json.dumps(payload, separators=(",", ":"), default=str)
    msg_id = new_message_id()  # one id for every attempt: the receiver can dedupe retries
    deadline = time.monotonic() + give_up_after_s
    delay, why = 0.5, "not sent"
    while True:
        try:
            r = httpx.post(url, content=body, headers=signed_headers(secret, body, msg_id), timeout=10)
            if r.status_code < 300:
                return None
            why = f"{url} answered {r.status_code}"
            if r.status_code < 500 and r.status_code not in (408, 425, 429):
                return why  # the receiver refuses this message: another attempt cannot help
        except httpx.HTTPError as exc:
            why = f"{url} unreachable ({type(exc).__name__})"
        if time.monotonic() + delay > deadline:
            return f"{why}; gave up after {give_up_after_s:.0f} s"
        time.sleep(random.uniform(0, delay))  # full jitter
        delay = min(delay * 2, 30.0)
