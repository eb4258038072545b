"""What every stage after ingest starts from, as one object instead of the same five parameters."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from schemas.config import AuditConfig
from schemas.details import IngestDetails, ingest_details
from schemas.records import Architecture, ModelRef, StageRecord

if TYPE_CHECKING:
    from schemas.stages import IngestOutput

    from microscope.pruning import Calibration
    from microscope.store import ArtifactStore

T = TypeVar("T", bound="StageInputs")


@dataclass(frozen=True)
class StageInputs:
    """The checkpoint (`ref`), ingest's record (digests, the tokenized data), the architecture, the audit's
    config and the store. A stage that needs more (the trace, its variants) extends it (`extend`)."""

    ref: ModelRef
    ingest: StageRecord
    arch: Architecture
    cfg: AuditConfig
    store: ArtifactStore

    @classmethod
    def of(cls, ing: IngestOutput, cfg: AuditConfig, store: ArtifactStore) -> StageInputs:
        """From the ingest stage's output, as the tasks hold it."""
        return cls(ing.model, ing.record, ing.architecture, cfg, store)

    def extend(self, cls: type[T], **more: Any) -> T:
        """These inputs as `cls`, a stage's own inputs that add fields to them."""
        return cls(**{f.name: getattr(self, f.name) for f in fields(StageInputs)}, **more)

    @property
    def ingested(self) -> IngestDetails:
        """Ingest's details, typed: the digests every stage keys on, where the tokens or images are."""
        return ingest_details(self.ingest)

    @property
    def model_digest(self) -> str:
        """What the model computes (weights, config, tokenizer): the first part of every stage's key."""
        return self.ingested.model_digest

    @property
    def dataset_digest(self) -> str:
        return self.ingested.dataset_digest

    def calibration(self) -> Calibration:
        """The audit's data as a pruned variant needs it (SNIP's minibatch, Wanda's activations)."""
        from microscope.modality import open_data

        return open_data(self.ingest, self.store).pruning_calibration(self.arch, self.cfg)
