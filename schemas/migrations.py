"""Audit records written by older code, brought up to the current schema when they are read.

Version 1: records without `schema_version` (everything written before issue 22). Each step fills only
what is absent, so running it over a record that already has the newer shape changes nothing.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 2  # 2: typed stage details (schemas/details), `schema_version` on the record


class SchemaVersionError(ValueError):
    """A record newer than this code reads: never guessed at."""


def check_version(data: dict[str, Any]) -> int:
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"schema_version must be a positive integer, not {version!r}")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"audit record {data.get('audit_id', '?')} has schema version {version}; this Microscope reads up to "
            f"{SCHEMA_VERSION}: upgrade Microscope"
        )
    return version


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a stored record's dict) at SCHEMA_VERSION; a copy where anything changes."""
    version = check_version(data)
    if version == 1:
        data = _v1_to_v2(data)
    return data


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    data = {**data, "schema_version": 2}
    stages = data.get("stages")
    if isinstance(stages, dict) and isinstance(stages.get("ingest"), dict):
        stages = data["stages"] = dict(stages)
        stages["ingest"] = _ingest(stages["ingest"])
    saes = data.get("saes")
    if isinstance(saes, dict):
        data["saes"] = {hook: _sae(hook, r) if isinstance(r, dict) else r for hook, r in saes.items()}
    return data


def _ingest(record: dict[str, Any]) -> dict[str, Any]:
    """Before issue 21 #1 ingest kept no `weights_digest`: its model_digest was the digest of the weights
    alone (what trace checks a reloaded model against; trace read it that way), so it is that."""
    details = record.get("details")
    if not isinstance(details, dict) or "model_digest" not in details or "weights_digest" in details:
        return record
    return {**record, "details": {**details, "weights_digest": details["model_digest"]}}


def _sae(hook: str, record: dict[str, Any]) -> dict[str, Any]:
    """Before joint training (one fit for several hooks) an SAE's record had no `trained_with`: each fit
    trained one SAE, its own hook's. `variant_fate_skipped` came with the per-variant fate: none then."""
    details = record.get("details")
    if record.get("status") not in ("completed", "cached", "partial") or not isinstance(details, dict):
        return record
    if "hook" not in details:  # not an SAE's own details (a failed part): left as written
        return record
    fill = {"trained_with": [hook], "variant_fate_skipped": {}}
    missing = {k: v for k, v in fill.items() if k not in details}
    return {**record, "details": {**details, **missing}} if missing else record
