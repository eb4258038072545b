"""The audit index as the viewer reads it: the listing (`audits.list_audits`, record JSON only), one
audit's record, and the cache key of its results."""

from __future__ import annotations

from schemas.config import canonical_hash
from schemas.records import AuditRecord, StageRecord

from microscope import audits
from microscope.audits import AuditRef, list_audits
from microscope.store import ArtifactStore

__all__ = ["AuditRef", "list_audits", "load_audit", "manifest_digest", "running"]

load_audit = audits.load


def _all_records(record: AuditRecord) -> list[tuple[str, StageRecord]]:
    out = list(record.stages.items())
    out += [(f"{s}[{v}]", r) for v, recs in sorted(record.variants.items()) for s, r in sorted(recs.items())]
    out += [(f"sae[{h}]", r) for h, r in sorted(record.saes.items())]
    return out


def manifest_digest(store: ArtifactStore, record: AuditRecord) -> str:
    """A short hash of what the audit's results are made of (each stage's status, config hash and
    manifest): changes whenever a stage finishes or is recomputed. The viewer's cache key beside the id."""
    del store  # the record names everything; kept for a uniform signature (a later version may read manifests)
    parts = {
        name: [r.status.value, r.config_hash, r.artifacts.get("manifest"), r.error] for name, r in _all_records(record)
    }
    return canonical_hash({"audit": record.audit_id, "status": record.status.value, "stages": parts}, length=12)


def running(store: ArtifactStore, run_id: str | None = None) -> list[dict[str, object]]:
    """Audits started and not yet finished (of `run_id`), oldest first: `audit_id`, `run_id`, `step`,
    `created_at` (from the markers running audits leave in the store)."""
    return [m.model_dump() for m in audits.in_flight(store, run_id)]
