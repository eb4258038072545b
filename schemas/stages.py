"""What the stages hand on to each other: built once by the flow and passed down, so a task never
re-reads another stage's outputs from the store to learn what it already knows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.records import Architecture, DatasetSummary, ModelRef, Record, StageRecord

AUDIT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$"  # no '..', no '/'
AUDIT_ID_MAX = 128


def check_audit_id(audit_id: str) -> str:
    """An audit id names files in the store (audits/<id>.json): refused before anything runs if it could climb."""
    import re

    if len(audit_id) > AUDIT_ID_MAX or not re.match(AUDIT_ID_PATTERN, audit_id):
        raise ValueError(
            f"audit id {audit_id[:40]!r} is not allowed: use letters, digits, '.', '_' and '-' (at most "
            f"{AUDIT_ID_MAX}, no '/' or '..')"
        )
    return audit_id


FP = "fp"  # the full-precision model's name wherever variants are listed; records keep variant=None


class IngestOutput(Record):
    """The model and dataset as every later stage needs them."""

    model: ModelRef
    record: StageRecord = Field(description="ingest's own record (cache keys, lineage).")
    model_digest: str
    dataset_digest: str
    modality: Literal["text", "images"]
    architecture: Architecture
    dataset: DatasetSummary

    @property
    def images(self) -> bool:
        return self.modality == "images"


class AuditRequest(Record):
    """The entry flow's parameters, after resolution: what to audit, how, and where it belongs."""

    audit_id: str = Field(
        pattern=AUDIT_ID_PATTERN,
        max_length=AUDIT_ID_MAX,
        description="Letters, digits, '.', '_' and '-', at most 128, starting with a letter or digit: it names "
        "files in the store, so never '/' or '..'.",
    )
    run_id: str | None = None
    step: int | None = Field(None, ge=0)
    tags: dict[str, str] = Field(default_factory=dict)
    stages: list[str] = Field(default_factory=list)
    store_uri: str
