"""Details of the landscape stage (microscope/landscape.py): loss curvature and loss-landscape slices over a
fixed, recorded subset, full precision in `stages["landscape"]`, a variant's in `variants[fmt]["landscape"]`.
Diagnostics: compare checkpoints of one run or a model with its variants, not across models."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from schemas.details._base import Details, StageDetails


class Eigenpair(Details):
    eigenvalue: float | None = Field(
        description="A top Hessian eigenvalue (largest algebraic first); None if not finite."
    )
    iterations: int = Field(description="Power-iteration steps it took.")
    converged: bool = Field(description="Whether the Rayleigh quotient met landscape.power_tol.")
    composition: dict[str, float] | None = Field(
        description="Its eigenvector's squared norm per block (module prefix, e.g. transformer.h.3), largest first; "
        "None where not recorded."
    )


class Slice1D(Details):
    alphas: list[float] = Field(description="α over [-span, span].")
    loss: list[float | None] = Field(description="Loss at θ + α·d (None: not finite).")
    direction_seed: int = Field(description="Seed of the filter-normalised direction d.")


class Slice2D(Details):
    alphas: list[float] = Field(description="α (rows).")
    betas: list[float] = Field(description="β (columns).")
    loss: list[list[float | None]] = Field(description="Loss at θ + α·d1 + β·d2: row i is alphas[i] (≤ 101×101).")
    direction_seeds: list[int] = Field(description="Seeds of d1 and d2.")


class SharpnessSettings(Details):
    eps: float = Field(description="ε of ε-sharpness (box relative to |θ| + 1).")
    rho: float = Field(description="ρ of ρ-sharpness.")
    adaptive: bool = Field(description="ASAM (adaptive) instead of SAM.")
    steps: int = Field(description="Ascent steps of ε-sharpness.")
    label: str = Field(description="How to read the figures (diagnostics).")
    seed: int = Field(description="Seed of the ascent's random start.")


class LandscapeDetails(StageDetails):
    """Everything `microscope.landscape.evaluate` returns but the subset's indices (results.json holds them). A
    model without a loss (an encoder without a head) gets `reason` and empty figures (`undefined`)."""

    omit_if_none = frozenset({"reason", "seed", "seeds", "kind", "samples", "per_batch", "config", "slice_1d",
                              "sharpness"})  # fmt: skip

    variant: str = Field(description="fp, or the quantized variant's produced format.")
    reason: str | None = Field(None, description="Why the landscape is undefined for this model (no figures then).")
    seed: int | None = Field(None, description="The audit seed; each random part's seed is in `seeds`.")
    seeds: dict[str, int] | None = Field(None, description="Seed per part: hessian, d1, d2, sharpness.")
    kind: str | None = Field(None, description="images or text (a causal LM): what the loss subset holds.")
    samples: int | None = Field(None, description="Images, or predicted tokens, the mean loss is over.")
    per_batch: int | None = Field(None, description="Images or token windows per forward pass.")
    config: dict[str, Any] | None = Field(None, description="The landscape section that ran (LandscapeConfig).")
    figures: dict[str, float] = Field(
        default_factory=dict,
        description="loss, lambda_max, lambda_2…, eps_sharpness, rho_sharpness, lipschitz_upper, jacobian_norm, "
        "slice_1d_curvature (finite values only).",
    )
    undefined: dict[str, str] = Field(default_factory=dict, description="Figure -> why it is undefined here.")
    eigen: list[Eigenpair] = Field(default_factory=list, description="Top Hessian eigenvalues, largest first.")
    slice_1d: Slice1D | None = Field(None, description="The 1-D slice along d1.")
    slice_2d: Slice2D | None = Field(None, description="The 2-D slice (None: landscape.slice_2d off).")
    sharpness: SharpnessSettings | None = Field(None, description="How the sharpness figures were measured.")
    jacobian_samples: int | None = Field(None, description="Images the Jacobian norm averages over (None: none).")
    seconds: dict[str, float] = Field(default_factory=dict, description="Wall time per part (loss, hessian, ...).")
    diagnostics_note: str = Field(
        "diagnostics: compare checkpoints of one run or a model with its variants, not across models",
        description="How to compare these figures.",
    )

    @classmethod
    def undefined_for(cls, prefix: str, variant: str, reason: str) -> LandscapeDetails:
        """The details of a model whose loss landscape is undefined (`reason`, one line)."""
        names = ("loss", "lambda_max", "eps_sharpness", "rho_sharpness", "slice_1d_curvature")
        return cls(prefix=prefix, variant=variant, reason=reason, undefined=dict.fromkeys(names, reason))
