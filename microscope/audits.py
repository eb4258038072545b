"""The audit index: one JSON record per audit under `audits/` in the artifact store."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from schemas.records import AuditRecord

from microscope.errors import InputError
from microscope.store import ArtifactStore


def new_audit_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def save(store: ArtifactStore, record: AuditRecord) -> str:
    return store.put_bytes(f"audits/{record.audit_id}.json", record.model_dump_json(indent=2).encode())


def load(store: ArtifactStore, audit_id: str) -> AuditRecord:
    key = f"audits/{audit_id}.json"
    if not store.exists(key):
        known = [k.removeprefix("audits/").removesuffix(".json") for k in store.list("audits")]
        matches = [k for k in known if k.startswith(audit_id)]
        if len(matches) == 1:
            key = f"audits/{matches[0]}.json"
        else:
            raise InputError(f"no audit '{audit_id}' in {store.uri}; `microscope list` shows the audits there")
    return AuditRecord.model_validate_json(store.get_bytes(key))


def list_all(store: ArtifactStore, run_id: str | None = None) -> list[AuditRecord]:
    """Every audit, oldest first; with `run_id`, that training run's audits in step order."""
    keys = [k for k in store.list("audits") if k.endswith(".json") and k.count("/") == 1]
    out = [AuditRecord.model_validate_json(store.get_bytes(k)) for k in keys]
    if run_id is not None:
        out = [r for r in out if r.run_id == run_id]
        return sorted(out, key=lambda r: (r.step if r.step is not None else -1, r.created_at))
    return sorted(out, key=lambda r: r.created_at)


def headline(record: AuditRecord) -> dict[str, dict[str, float]]:
    """The summary figures of every stage, variant and SAE (`stage`, `stage[variant]`, `sae[hook]`): what a
    callback or a status query carries, without the full record."""
    out = {s: dict(r.metrics) for s, r in record.stages.items() if r.metrics}
    out |= {f"{s}[{v}]": dict(r.metrics) for v, recs in record.variants.items() for s, r in recs.items() if r.metrics}
    out |= {f"sae[{h}]": dict(r.metrics) for h, r in record.saes.items() if r.metrics}
    return out
