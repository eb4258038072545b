"""The audit index: one JSON record per audit under `audits/` in the artifact store, saved when the audit
ends, and a small marker per audit still running under `audits/in-flight/`. Listed two ways: `list_all`
validates each record (the gates, a run's series), `list_audits` reads the plain JSON of each into an
`AuditRef` (what a picker shows, fast on large records)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.config import canonical_hash
from schemas.records import AuditRecord, AuditStart
from schemas.stages import AUDIT_ID_MAX

from microscope.errors import InputError, StorageError, describe_os_error
from microscope.store import ArtifactStore

IN_FLIGHT = "audits/in-flight"


def new_audit_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def save(store: ArtifactStore, record: AuditRecord) -> str:
    return store.put_bytes(f"audits/{record.audit_id}.json", record.model_dump_json(indent=2).encode())


def save_or_spill(store: ArtifactStore, record: AuditRecord) -> str:
    """Save the record; where the store cannot take it (full, read-only since the audit started), write it
    to the local temp folder and say where, so that the audit's outcome is never lost."""
    try:
        return save(store, record)
    except OSError as exc:
        spill = Path(tempfile.gettempdir()) / "microscope-records" / f"{record.audit_id}.json"
        spill.parent.mkdir(parents=True, exist_ok=True)
        spill.write_text(record.model_dump_json(indent=2))
        raise StorageError(
            f"{describe_os_error(exc, f'the record of audit {record.audit_id} was not saved in {store.uri}')}; "
            f"it is kept at {spill}: copy it to the store's audits/ folder"
        ) from None


def load(store: ArtifactStore, audit_id: str) -> AuditRecord:
    if len(audit_id) > AUDIT_ID_MAX:  # before it becomes a path: the file system would say "name too long"
        raise InputError(
            f"'{audit_id[:20]}…' ({len(audit_id)} characters) is no audit id; ids have at most {AUDIT_ID_MAX}"
        )
    key = f"audits/{audit_id}.json"
    if not store.exists(key):  # a unique prefix of an id; only records count (not logs, not markers)
        known = [
            k.removeprefix("audits/").removesuffix(".json")
            for k in store.list("audits")
            if k.endswith(".json") and k.count("/") == 1
        ]
        matches = [k for k in known if k.startswith(audit_id)]
        if len(matches) == 1:
            key = f"audits/{matches[0]}.json"
        elif matches:
            shown = ", ".join(sorted(matches)[:3]) + (", …" if len(matches) > 3 else "")
            raise InputError(f"'{audit_id}' matches {len(matches)} audits ({shown}); give more of the id")
        else:
            raise InputError(f"no audit '{audit_id}' in {store.uri}; `microscope list` shows the audits there")
    try:
        return AuditRecord.model_validate_json(store.get_bytes(key))
    except ValueError as exc:  # pydantic's ValidationError (bad JSON too) is a ValueError
        raise InputError(
            f"audit record {store.uri_for(key)} is unreadable ({str(exc).splitlines()[-1].strip()}); "
            "restore it from a backup or delete it"
        ) from None


def list_all(store: ArtifactStore, run_id: str | None = None, unreadable: list[str] | None = None) -> list[AuditRecord]:
    """Every audit, oldest first; with `run_id`, that training run's audits in step order. A record that
    does not parse (truncated, edited by hand) is left out, never breaks the listing of all the others:
    its key goes into `unreadable` for the caller to say so."""
    keys = [k for k in store.list("audits") if k.endswith(".json") and k.count("/") == 1]
    out = []
    for k in keys:
        try:
            out.append(AuditRecord.model_validate_json(store.get_bytes(k)))
        except ValueError as exc:  # pydantic's ValidationError (bad JSON too) is a ValueError
            if unreadable is not None:
                unreadable.append(f"{k} ({str(exc).splitlines()[0]})")
    if run_id is not None:
        out = [r for r in out if r.run_id == run_id]
        return sorted(out, key=lambda r: (r.step if r.step is not None else -1, r.created_at))
    return sorted(out, key=lambda r: r.created_at)


@dataclass(frozen=True)
class AuditRef:
    """An audit as the index lists it: what a picker shows, without the stage details."""

    audit_id: str
    run_id: str | None
    step: int | None
    status: str
    created_at: datetime
    model_source: str
    digest: str | None  # the weights' digest (None when ingest failed)
    model_name: str = ""  # the architecture's class (or the checkpoint's file name before ingest)
    config_digest: str = ""  # same model digest and config digest: the same audit run again

    @property
    def label(self) -> str:
        """How a person names the audit: model, run and step, time, and the id's tail."""
        where = f"{self.run_id} step {self.step}" if self.run_id else self.created_at.strftime("%Y-%m-%d %H:%M")
        return f"{self.model_name or '?'} · {where} · {self.status} · …{self.audit_id[-6:]}"


def _ref(raw: dict[str, Any]) -> AuditRef:
    return AuditRef(
        audit_id=raw["audit_id"],
        run_id=raw.get("run_id"),
        step=raw.get("step"),
        status=str(raw["status"]),
        created_at=datetime.fromisoformat(raw["created_at"]),
        model_source=(raw.get("model") or {}).get("source", ""),
        digest=raw.get("model_digest"),
        model_name=((raw.get("architecture") or {}).get("class_name") or _file_name(raw)),
        config_digest=canonical_hash(raw.get("config") or {}, length=12),
    )


def list_audits(
    store: ArtifactStore,
    run_id: str | None = None,
    model: str | None = None,
    status: str | None = None,
    unreadable: list[str] | None = None,
) -> list[AuditRef]:
    """Every audit in the store, oldest first; with `run_id` that run's in step order. `model` matches a
    substring of the checkpoint's source or a prefix of its digest; `status` the audit's status. A record
    that is not readable (truncated, not JSON, missing its id) is left out and named in `unreadable`, so
    one damaged file does not hide every other audit."""
    out = []
    for key in store.list("audits"):
        if not key.endswith(".json") or key.count("/") != 1:
            continue
        try:
            ref = _ref(json.loads(store.get_bytes(key)))  # plain JSON: no validation of the large details
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if unreadable is not None:
                unreadable.append(f"{key} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue
        if run_id is not None and ref.run_id != run_id:
            continue
        if model is not None and model not in ref.model_source and not (ref.digest or "").startswith(model):
            continue
        if status is not None and ref.status != str(status):
            continue
        out.append(ref)
    if run_id is not None:
        return sorted(out, key=lambda r: (r.step if r.step is not None else -1, r.created_at))
    return sorted(out, key=lambda r: r.created_at)


def _file_name(raw: dict[str, Any]) -> str:
    source = str((raw.get("model") or {}).get("source", ""))
    return source.rstrip("/").rsplit("/", 1)[-1]


def mark_started(store: ArtifactStore, record: AuditRecord) -> None:
    """Leave the marker of a running audit: its record is only saved when it ends."""
    start = AuditStart(
        audit_id=record.audit_id,
        run_id=record.run_id,
        step=record.step,
        created_at=record.created_at,
        prefect_flow_run_id=record.prefect_flow_run_id,
        host=socket.gethostname(),
        pid=os.getpid(),
    )
    store.put_bytes(f"{IN_FLIGHT}/{record.audit_id}.json", start.model_dump_json().encode())


def mark_finished(store: ArtifactStore, audit_id: str) -> None:
    """Drop the marker, once the record is saved (so no moment shows neither)."""
    store.delete(f"{IN_FLIGHT}/{audit_id}.json")


def in_flight(store: ArtifactStore, run_id: str | None = None) -> list[AuditStart]:
    """Audits started and not finished (of `run_id`), oldest first. A marker whose audit saved its record
    since that start is finished: the record is saved just before the marker is dropped. A marker whose
    process is gone from this machine was left by a killed audit (an interrupted `make demo`, a stopped
    worker) and is not in flight; one from another machine or pod cannot be judged from here and stays
    (whoever waits for it does so with a bound)."""
    out = []
    for key in store.list(IN_FLIGHT):
        if not key.endswith(".json") or key.count("/") != 2:
            continue
        try:
            start = AuditStart.model_validate_json(store.get_bytes(key))
        except InputError:  # dropped between the listing and the read: that audit just finished
            continue
        if run_id is not None and start.run_id != run_id:
            continue
        rec_key = f"audits/{start.audit_id}.json"
        if store.exists(rec_key) and _created_at(store, rec_key) >= start.created_at:
            continue
        if _killed(start):
            continue
        out.append(start)
    return sorted(out, key=lambda s: s.created_at)


def _killed(start: AuditStart) -> bool:
    """The marker's process ran on this host and exists no more. (A reused pid reads as alive: the safe side,
    a bounded wait.)"""
    if start.pid is None or start.host != socket.gethostname():
        return False
    try:
        os.kill(start.pid, 0)  # signal 0: only whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, another user's
        return False
    return False


def _created_at(store: ArtifactStore, key: str) -> datetime:
    return datetime.fromisoformat(json.loads(store.get_bytes(key))["created_at"])


def headline(record: AuditRecord) -> dict[str, dict[str, float]]:
    """The summary figures of every stage, variant and SAE (`stage`, `stage[variant]`, `sae[hook]`): what a
    callback or a status query carries, without the full record."""
    out = {s: dict(r.metrics) for s, r in record.stages.items() if r.metrics}
    out |= {f"{s}[{v}]": dict(r.metrics) for v, recs in record.variants.items() for s, r in recs.items() if r.metrics}
    out |= {f"sae[{h}]": dict(r.metrics) for h, r in record.saes.items() if r.metrics}
    return out
