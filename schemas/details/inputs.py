"""Details of the stages that load, quantize and trace the model, and of the report."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from schemas.details._base import Details, StageDetails


class NonFinite(Details):
    """One weight tensor's non-finite values (audited only with model.allow_nonfinite)."""

    nan: int
    inf: int


class IngestDetails(StageDetails):
    """ingest (microscope/stages/ingest.py): the digests later stages key on and where the dataset is.
    One model for both modalities: the text-only and image-only keys are left out for the other one."""

    omit_if_none = frozenset(
        {
            "nonfinite",
            "tokens_key",
            "documents_read",
            "documents_tokenized",
            "last_document_cut",
            "images_key",
            "image_shape",
        }
    )

    model_digest: str = Field(description="Digest of what decides the outputs: weights, class, config, tokenizer.")
    weights_digest: str = Field(
        description="Digest of the weights alone, which trace checks the reloaded model against. Records "
        "before issue 21 lack it; their model_digest was this digest (filled in on loading)."
    )
    nonfinite: dict[str, NonFinite] | None = Field(
        None,
        description="Tensor -> counts of its NaN / inf values ({} when all are finite); None: not counted "
        "(records before issue 21 #3).",
    )
    dataset_digest: str = Field(description="Digest of the token windows (text) or of the images and labels.")
    modality: Literal["text", "images"]
    tokens_key: str | None = Field(None, description="Text: store key of the packed token windows (Parquet).")
    documents_read: int | None = Field(None, description="Text: documents read and digested (the whole file).")
    documents_tokenized: int | None = Field(
        None, description="Text: documents tokenized (tokenizing stops once the windows are full)."
    )
    last_document_cut: bool | None = Field(None, description="Text: whether the last document tokenized was cut.")
    images_key: str | None = Field(None, description="Images: store key of the images and labels (.npz, x and y).")
    image_shape: list[int] | None = Field(None, description="Images: the shape of one image, e.g. [1, 28, 28].")

    @model_validator(mode="after")
    def _where_the_data_is(self) -> IngestDetails:
        where = "tokens_key" if self.modality == "text" else "images_key"
        if getattr(self, where) is None:
            raise ValueError(f"{self.modality} ingest details lack {where}")
        return self


class QuantizeAttempt(Details):
    format: str = Field(description="A format of the fallback chain that could not be produced.")
    error: str = Field(description="Why: too little memory for it, or the error building it.")


class HookDrift(Details):
    """The quantized model's activations at one hook against full precision's."""

    cosine: float = Field(description="Mean cosine similarity per token.")
    rel_error: float = Field(description="‖h_q − h‖ / ‖h‖ over all the evaluated tokens.")


class Pruning(Details):
    """What pruning did to a pruned variant (microscope/pruning.py), before any quantization after it."""

    method: str = Field(description="magnitude, snip or wanda.")
    scope: str = Field(description="global (one threshold over all pruned matrices) or layer (per matrix or row).")
    target: float = Field(description="The sparsity asked for, a fraction.")
    overall: float = Field(description="Zeros over all pruned matrices after pruning, a fraction (exact count).")
    matrices: dict[str, float] = Field(description="Pruned module -> the exact fraction of its weight zeroed.")
    calibration: str | None = Field(description="The data SNIP's loss or Wanda's norms came from (None: magnitude).")
    note: str = Field(description="No fine-tuning after pruning: the what-if of pruning as is.")


class QuantizeDetails(StageDetails):
    """quantize (microscope/stages/quantize.py): one variant, in `AuditRecord.variants[fmt]["quantize"]`."""

    requested: str = Field(description="The format asked for.")
    produced: str = Field(description="The format made: another one when the chain fell back.")
    fell_back: bool
    attempts: list[QuantizeAttempt] = Field(description="The formats tried before `produced`, with why each failed.")
    estimated_bytes_requested: int = Field(description="Weight memory the requested format was estimated to need.")
    description: str = Field(description="What the produced format is (quantization.FORMATS).")
    paths: dict[str, int] = Field(description="Compute path (kernel) -> how many quantized layers run on it.")
    drift: dict[str, HookDrift] = Field(description="Hook name -> activation drift ({} for image classifiers).")
    most_drifting_hook: str | None = Field(description="The hook of the largest rel_error (None: no drift measured).")
    eval_tokens: int = Field(description="Tokens (text) or images the fidelity was measured on.")
    pruning: Pruning | None = Field(None, description="A pruned variant: what was pruned; absent otherwise.")

    omit_if_none = frozenset({"pruning"})


class ActivationStats(Details):
    """Summary of one traced dataset's activation vectors."""

    tokens: float = Field(description="Rows (tokens) traced, as a float.")
    mean_norm: float
    std_norm: float
    max_norm: float
    near_zero_frac: float = Field(description="Fraction of entries near zero.")


class TraceDataset(Details):
    """One (layer, hook) dataset of the activation cache."""

    layer: int
    hook: str = Field(description="The hook kind: resid, mlp, attn.")
    module: str = Field(description="The module path hooked, e.g. transformer.h.1.")
    d: int | None = Field(description="Width of the activation vectors.")
    rows: int = Field(description="Rows (tokens) traced.")
    parts: list[str] = Field(description="Store keys of its Parquet parts, in order.")
    stats: ActivationStats


class TraceDetails(StageDetails):
    """trace (microscope/stages/trace.py): full precision in `stages["trace"]`, a variant's in `variants`."""

    datasets: dict[str, TraceDataset] = Field(description="Hook name (blocks.1.hook_resid_post) -> its dataset.")
    resumed_from_window: int = Field(description="The window a resumed trace started from (0: traced whole).")


class ReportDetails(StageDetails):
    """report (microscope/stages/report.py)."""

    report_key: str = Field(description="Store key of the HTML report.")
