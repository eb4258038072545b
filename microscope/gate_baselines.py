"""The audit a gate judges against: `previous` (the highest lower step of the run, its latest audit), `first`,
`tag:KEY[=VALUE]`, an audit id, or `none`.

A training job that saves checkpoints faster than they are audited gets audits side by side: step 20's gate
may run while step 10's audit is still running. Its record is saved only when it ends, but it leaves a marker
(`audits.in_flight`) from its start, so the gate waits for it, polling the store within a bound, rather than
judge against an older step or call step 20 the first audited checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from schemas.records import AuditRecord, AuditStart, StageStatus

from microscope import audits, results
from microscope.errors import GateError, InputError
from microscope.store import ArtifactStore

POLL_S = 2.0  # the longest pause between two looks at the store while waiting


@dataclass(frozen=True)
class Baseline:
    record: AuditRecord | None
    reason: str | None = None  # why there is none (relative rules are skipped with it)
    waited_s: float | None = None  # how long the gate waited for an audit in progress (None: it did not)
    waited_for: str | None = None  # that audit's id


def resolve_baseline(store: ArtifactStore, record: AuditRecord, spec: str, *, wait_s: float = 0.0) -> Baseline:
    """The baseline audit `spec` names for `record`. An explicit audit id or tag that matches nothing is an
    error; `previous`/`first` of a checkpoint without predecessor are not. With `previous`/`first`, an audit
    of a lower step still running that would be the baseline is waited for, at most `wait_s` seconds."""
    if spec == "none":
        return Baseline(None, "no baseline requested (baseline: none)")
    if spec.startswith("tag:") and not spec[4:].partition("=")[0].strip():
        raise GateError(f"baseline {spec!r} names no tag; write tag:KEY or tag:KEY=VALUE")
    if spec not in ("previous", "first") and not spec.startswith("tag:"):
        try:
            return Baseline(results.load_audit(store, spec))
        except InputError as exc:
            if "matches" in str(exc):  # an ambiguous prefix: say which audits it matched
                raise GateError(f"baseline {exc}") from None
            raise GateError(
                f"baseline {spec!r} is no audit in {store.uri}; use previous, first, none, an audit id or tag:KEY"
            ) from None
    if not record.run_id:
        return Baseline(None, f"this audit belongs to no training run (--run-id), so it has no {spec} audit")
    if spec.startswith("tag:"):
        key, _, value = spec[4:].partition("=")
        tagged = [r for r in _finished(store, record) if _tagged(store, r.audit_id, key, value)]
        if not tagged:
            raise GateError(f"no audit of run {record.run_id} carries the tag {spec[4:]!r}; tag one with --tag")
        return Baseline(results.load_audit(store, tagged[-1].audit_id))
    if record.step is None:
        return Baseline(None, f"this audit has no step, so it has no {spec} audit in run {record.run_id}")
    return _by_step(store, record, record.step, spec, wait_s)


def _by_step(store: ArtifactStore, record: AuditRecord, step: int, spec: str, wait_s: float) -> Baseline:
    poll = min(POLL_S, max(wait_s / 10, 0.05))  # a short bound (a test, a CLI) is not overshot by a full poll
    t0 = time.monotonic()
    pending: AuditStart | None = None
    while True:
        pick, running, failed = _candidates(store, record, step, spec)
        if running is None:
            break
        pending, waited = running, time.monotonic() - t0
        if waited >= wait_s:
            return Baseline(
                None,
                f"gave up waiting for audit {running.audit_id} (step {running.step} of run {record.run_id}), still "
                f"in progress after {waited:.1f} s (gate.wait_previous_s: {wait_s:g}); it would be the {spec} "
                "baseline",
                waited,
                running.audit_id,
            )
        time.sleep(min(poll, wait_s - waited))
    waited_s = time.monotonic() - t0 if pending is not None else None
    waited_for = pending.audit_id if pending is not None else None
    if pick is not None:
        return Baseline(results.load_audit(store, pick.audit_id), None, waited_s, waited_for)
    if failed:  # lower steps were audited, none successfully: not the first checkpoint either
        f = failed[-1]
        why = (
            f"no audit of a lower step of run {record.run_id} succeeded (step {f.step}: audit {f.audit_id} {f.status})"
        )
    else:
        why = f"step {step} is the first audited checkpoint of run {record.run_id}"
    return Baseline(None, why, waited_s, waited_for)


def _candidates(
    store: ArtifactStore, record: AuditRecord, step: int, spec: str
) -> tuple[results.AuditRef | None, AuditStart | None, list[results.AuditRef]]:
    """The finished lower-step audit `spec` picks; the running lower-step one that would outrank it once
    finished (None: nothing to wait for); the failed lower-step audits."""
    lower = [
        r
        for r in results.list_audits(store, run_id=record.run_id)
        if r.audit_id != record.audit_id and r.step is not None and r.step < step
    ]
    done = [r for r in lower if r.status != StageStatus.failed.value]
    failed = [r for r in lower if r.status == StageStatus.failed.value]
    running = [
        s
        for s in audits.in_flight(store, record.run_id)
        if s.audit_id != record.audit_id and s.step is not None and s.step < step
    ]

    def key(r: results.AuditRef | AuditStart) -> tuple[int, datetime]:
        return (r.step or 0, r.created_at)

    if spec == "previous":  # the highest lower step, its latest audit
        pick = max(done, key=key, default=None)
        ahead = max((s for s in running if pick is None or key(s) > key(pick)), key=key, default=None)
    else:  # first: the lowest step, its earliest audit
        pick = min(done, key=key, default=None)
        ahead = min((s for s in running if pick is None or key(s) < key(pick)), key=key, default=None)
    return pick, ahead, failed


def _finished(store: ArtifactStore, record: AuditRecord) -> list[results.AuditRef]:
    return [
        r
        for r in results.list_audits(store, run_id=record.run_id)
        if r.audit_id != record.audit_id and r.status != StageStatus.failed.value and r.step is not None
    ]


def _tagged(store: ArtifactStore, audit_id: str, key: str, value: str) -> bool:
    tags = results.load_audit(store, audit_id).tags
    return key in tags and (not value or tags[key] == value)
