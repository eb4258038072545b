"""Typed stage details: one model per stage kind, for `StageRecord.details`.

Records keep `details` a plain dict (audits on disk keep their shape); readers get a typed view with
`details_of(record)` or a stage's own function (`ingest_details(record)`, ...), and writers build the dict
as `SomeDetails(...).model_dump(mode="json")`.

Which model a record's details take: a skipped record holds `SkippedDetails`, a failed one `FailedDetails`,
the roll-up of a stage run per variant or hook (`stages["quantize"]`, `stages["sae"]`, `stages["robustness"]`
when its fp part failed) `AggregateDetails`; otherwise the stage's model in `STAGE_DETAILS` (a metrics
record of variant "shard-N" is a weight shard: "metrics-weights").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, Field

from schemas.details._base import Details, StageDetails
from schemas.details.attribution import AttributionDetails
from schemas.details.inputs import (
    ActivationStats,
    HookDrift,
    IngestDetails,
    NonFinite,
    Pruning,
    QuantizeAttempt,
    QuantizeDetails,
    ReportDetails,
    TraceDataset,
    TraceDetails,
)
from schemas.details.landscape import LandscapeDetails
from schemas.details.metrics import (
    Cka,
    Esd,
    FisherMap,
    MetricsDetails,
    MetricsShardDetails,
    SensitivityRow,
    WeightRow,
)
from schemas.details.reliability import ReliabilityDetails
from schemas.details.robustness import AutoAttackResult, Curves, FeatureShift, RobustnessDetails
from schemas.details.sae import ContextShown, DensityHist, SaeDetails, TopFeature, VariantEffect
from schemas.gates import GateVerdict

if TYPE_CHECKING:
    from schemas.records import StageRecord

# gate: the verdict itself is the details (microscope/gates.stage_record); no prefix, it is not a stage run
GateDetails = GateVerdict


class SkippedDetails(Details):
    """A stage that did not run (flows/tracker.skip_missing)."""

    reason: str = Field(description="not requested, an earlier stage failed, or the stage's own reason.")


class FailedDetails(Details):
    """A failed stage (flows/settle.py); its one-line cause is `StageRecord.error`."""

    omit_if_none = frozenset({"input_error"})

    input_error: bool | None = Field(
        None, description="True: the user's input was wrong (exit code 2); absent when the cause is unknown."
    )


class AggregateDetails(Details):
    """One record for a stage run per variant or hook (flows/tracker.aggregate)."""

    parts: dict[str, str] = Field(description="Variant or hook -> its record's status.")
    reasons: dict[str, str | None] = Field(description="Failed part -> its error.")


STAGE_DETAILS: dict[str, type[BaseModel]] = {
    "ingest": IngestDetails,
    "quantize": QuantizeDetails,
    "trace": TraceDetails,
    "sae": SaeDetails,
    "metrics": MetricsDetails,
    "metrics-weights": MetricsShardDetails,
    "robustness": RobustnessDetails,
    "reliability": ReliabilityDetails,
    "landscape": LandscapeDetails,
    "attribution": AttributionDetails,
    "report": ReportDetails,
    "gate": GateDetails,
}

M = TypeVar("M", bound=BaseModel)


def details_model(record: StageRecord) -> type[BaseModel]:
    """The model `record.details` validates as (see the module's docstring)."""
    if record.status == "skipped":
        return SkippedDetails
    if "parts" in record.details:  # the aggregate's shape is its only mark: it shares the stage's name
        return AggregateDetails
    if record.status == "failed":
        return FailedDetails
    shard = record.stage == "metrics" and (record.variant or "").startswith("shard-")
    kind = "metrics-weights" if shard else record.stage
    if kind not in STAGE_DETAILS:
        raise ValueError(f"stage {record.stage!r} has no details model (known: {', '.join(STAGE_DETAILS)})")
    return STAGE_DETAILS[kind]


def details_of(record: StageRecord) -> BaseModel:
    """`record.details` validated into its model."""
    return details_model(record).model_validate(record.details)


def _typed(record: StageRecord, model: type[M]) -> M:
    got = details_model(record)
    if got is not model:
        raise ValueError(
            f"{record.stage} record ({record.status}) holds {got.__name__}, not {model.__name__}"
            + (f": {record.error}" if record.error else "")
        )
    return model.model_validate(record.details)


def ingest_details(record: StageRecord) -> IngestDetails:
    return _typed(record, IngestDetails)


def quantize_details(record: StageRecord) -> QuantizeDetails:
    return _typed(record, QuantizeDetails)


def trace_details(record: StageRecord) -> TraceDetails:
    return _typed(record, TraceDetails)


def sae_details(record: StageRecord) -> SaeDetails:
    return _typed(record, SaeDetails)


def metrics_details(record: StageRecord) -> MetricsDetails:
    return _typed(record, MetricsDetails)


def metrics_shard_details(record: StageRecord) -> MetricsShardDetails:
    return _typed(record, MetricsShardDetails)


def robustness_details(record: StageRecord) -> RobustnessDetails:
    return _typed(record, RobustnessDetails)


def report_details(record: StageRecord) -> ReportDetails:
    return _typed(record, ReportDetails)


def reliability_details(record: StageRecord) -> ReliabilityDetails:
    return _typed(record, ReliabilityDetails)


def gate_details(record: StageRecord) -> GateVerdict:
    return _typed(record, GateVerdict)


__all__ = [
    "STAGE_DETAILS",
    "ActivationStats",
    "AggregateDetails",
    "AttributionDetails",
    "AutoAttackResult",
    "Cka",
    "ContextShown",
    "Curves",
    "DensityHist",
    "Details",
    "Esd",
    "FailedDetails",
    "FeatureShift",
    "FisherMap",
    "GateDetails",
    "HookDrift",
    "IngestDetails",
    "LandscapeDetails",
    "MetricsDetails",
    "MetricsShardDetails",
    "NonFinite",
    "Pruning",
    "QuantizeAttempt",
    "QuantizeDetails",
    "ReliabilityDetails",
    "ReportDetails",
    "RobustnessDetails",
    "SaeDetails",
    "SensitivityRow",
    "SkippedDetails",
    "StageDetails",
    "TopFeature",
    "TraceDataset",
    "TraceDetails",
    "VariantEffect",
    "WeightRow",
    "details_model",
    "details_of",
    "gate_details",
    "ingest_details",
    "metrics_details",
    "metrics_shard_details",
    "quantize_details",
    "reliability_details",
    "report_details",
    "robustness_details",
    "sae_details",
    "trace_details",
]
