"""Details of one SAE (microscope/stages/sae.py): `AuditRecord.saes[hook]`."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from schemas.details._base import Details, StageDetails


class DensityHist(Details):
    """Histogram of the latents' firing densities on the held-out rows."""

    bins_log10: list[float] = Field(description="Bin edges, log10 of the density.")
    counts: list[int]
    never_fired: int = Field(description="Latents that never fired (left out of the histogram).")


class VariantEffect(Details):
    """The SAE run on a quantized variant's activations (same held-out tokens)."""

    fvu: float
    l0: float
    fvu_shift: float = Field(description="fvu − full precision's fvu.")
    l0_shift: float = Field(description="l0 − full precision's l0.")


class ContextShown(Details):
    """A top-activating context as the report shows it (the per-token lists stay in features.parquet)."""

    left: str
    token: str
    right: str
    activation: float
    window: int
    position: int


class TopFeature(Details):
    """One of the report's showcase features."""

    feature: int
    density: float
    mean_activation: float
    top_contexts: list[ContextShown]
    top_logits: list[str] | None = Field(description="Tokens it promotes most (None: the model has no unembedding).")
    bottom_logits: list[str] | None = Field(description="Tokens it suppresses most (None: no unembedding).")


class ImportedSae(Details):
    """Where an SAE imported in SAELens' layout came from (microscope/sae/external.py)."""

    source: str = Field(description="The folder it was imported from.")
    weights_sha256: str = Field(description="sha256 of the imported sae_weights.safetensors.")
    saelens_cfg: dict[str, Any] = Field(description="The imported cfg.json as SAELens wrote it.")


class SaeDetails(StageDetails):
    """sae: one trained SAE (its own prefix; written by the SAE stage itself, not through `StageRun.record`)."""

    hook: str
    architecture: str = Field(description="topk, batchtopk, relu or jumprelu.")
    d_in: int
    d_sae: int
    activation_scale: float = Field(description="Scale applied to activations before training (undone on saving).")
    density_hist: DensityHist
    variants: dict[str, VariantEffect] = Field(description="Variant -> the SAE on its activations.")
    variant_fate_skipped: dict[str, str] = Field(
        default_factory=dict, description="Variant -> why its per-latent fate was not measured."
    )
    resumed_from_step: int = Field(description="The training step a resumed fit started from (0: from scratch).")
    train_tokens_per_epoch: int
    trained_with: list[str] = Field(
        description="The hooks whose SAEs one fit trained together (joint mode); [hook] alone otherwise."
    )
    top_features: list[TopFeature] = Field(description="The densest non-dense features, best context first.")
    imported: ImportedSae | None = Field(None, description="An SAE imported, not trained here: its provenance.")

    omit_if_none = frozenset({"imported"})
