"""What the stages hand on to each other: built once by the flow and passed down, so a task never
re-reads another stage's outputs from the store to learn what it already knows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.records import Architecture, DatasetSummary, ModelRef, Record, StageRecord

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

    audit_id: str
    run_id: str | None = None
    step: int | None = Field(None, ge=0)
    tags: dict[str, str] = Field(default_factory=dict)
    stages: list[str] = Field(default_factory=list)
    store_uri: str
