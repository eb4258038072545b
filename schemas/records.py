"""Result records: small, JSON-serialisable, passed between tasks and read by the viewer and CI.

They carry URIs and summary figures, never tensors or frames; big things live in the artifact store.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.migrations import SCHEMA_VERSION, SchemaVersionError, migrate


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageStatus(StrEnum):
    completed = "completed"
    cached = "cached"
    partial = "partial"  # some variants or parts finished, others failed (each with its reason)
    failed = "failed"
    skipped = "skipped"


class HookPoints(Record):
    """Module paths resolved for one block; None where the family has no such point."""

    layer: int
    resid: str
    mlp: str | None = None
    attn: str | None = None


class ModelParams(Record):
    name: str
    type: str
    params: int


class Architecture(Record):
    family: str = Field(description="Adapter family: gpt2, llama, bert, gpt_neox, generic, ...")
    model_type: str | None = Field(None, description="HF config.model_type where there is one.")
    class_name: str
    n_layers: int
    hidden_size: int | None = None
    n_heads: int | None = None
    vocab_size: int | None = None
    n_params: int
    dtype: str
    has_unembedding: bool = False
    is_causal: bool = False
    modules: list[ModelParams] = Field(default_factory=list, description="Parameters per module.")
    hook_points: list[HookPoints] = Field(default_factory=list)


class ValidationCheck(Record):
    expectation: str
    success: bool
    detail: str = ""


class DatasetSummary(Record):
    source: str
    text_digest: str = Field(description="sha256 of the documents' text, in order.")
    n_documents: int
    n_tokens: int = Field(description="Tokens packed into windows (what the model sees).")
    n_windows: int
    seq_len: int
    tokens_per_doc_mean: float
    tokens_per_doc_max: int
    truncated: bool = Field(description="True when max_tokens cut the dataset short.")
    checks: list[ValidationCheck] = Field(default_factory=list)


class StageRecord(Record):
    stage: str
    status: StageStatus
    variant: str | None = Field(None, description="Quantized variant this record is about (None: full precision).")
    config_hash: str | None = None
    input_digests: dict[str, str] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict, description="Name -> URI in the artifact store.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Summary figures.")
    undefined: dict[str, str] = Field(
        default_factory=dict,
        description="Figures that are undefined for this input -> why (they are absent from `metrics`).",
    )
    details: dict[str, Any] = Field(default_factory=dict, description="Small structured results.")
    started_at: datetime | None = None
    finished_at: datetime | None = None
    seconds: float | None = Field(None, description="Wall time of the computation that produced it.")
    error: str | None = None
    mlflow_run_id: str | None = None


class ModelRef(Record):
    """What later stages need to reload the model: where it is and what it must hash to."""

    source: str
    resolved_path: str | None = None
    module: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    allow_partial_weights: bool = False
    allow_nonfinite: bool = False
    source_fingerprint: str = Field(description="sha256 of the checkpoint files' bytes (ingest's cache key).")


class AuditRecord(Record):
    schema_version: int = Field(
        SCHEMA_VERSION, description="The record's schema (schemas/migrations.py); absent in stored records: 1."
    )
    audit_id: str
    run_id: str | None = Field(None, description="The training run this checkpoint belongs to.")
    step: int | None = Field(None, ge=0, description="The checkpoint's training step within its run.")
    tags: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    finished_at: datetime | None = None
    status: StageStatus
    model: ModelRef
    model_digest: str | None = None
    architecture: Architecture | None = None
    dataset_source: str | None = None
    dataset_digest: str | None = None
    dataset: DatasetSummary | None = None
    config: dict[str, Any]
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    variants: dict[str, dict[str, StageRecord]] = Field(
        default_factory=dict, description="Per quantized variant: its quantize and trace records."
    )
    saes: dict[str, StageRecord] = Field(default_factory=dict, description="Per hook name: its SAE's record.")
    report_uri: str | None = None
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    prefect_flow_run_id: str | None = None
    store_uri: str
    error: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _current_schema(cls, data: Any) -> Any:
        # also runs on AuditRecord(...) without schema_version: harmless, each step only fills what is absent
        return migrate(data) if isinstance(data, dict) else data

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise _too_new(exc) or exc from None

    @classmethod
    def model_validate_json(cls, json_data: Any, *args: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate_json(json_data, *args, **kwargs)
        except ValidationError as exc:
            raise _too_new(exc) or exc from None


def _too_new(exc: ValidationError) -> SchemaVersionError | None:
    """A record too new to read, as its one line rather than pydantic's report around it (still a ValueError,
    which the audit listing catches)."""
    for e in exc.errors():
        if isinstance(err := (e.get("ctx") or {}).get("error"), SchemaVersionError):
            return err
    return None


class AuditStart(Record):
    """The marker an audit leaves in the store while it runs (`audits/in-flight/`), dropped once its record
    is saved: until then a later audit of its run knows a lower step is on its way (a gate waits for it)."""

    audit_id: str
    run_id: str | None = None
    step: int | None = None
    created_at: datetime = Field(description="The audit's start: its record's created_at.")
    prefect_flow_run_id: str | None = None
    host: str | None = Field(None, description="Host name of the machine (pod) running the audit.")
    pid: int | None = Field(None, description="Process running the audit: on its own host, gone means killed.")
