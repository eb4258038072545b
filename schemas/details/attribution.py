"""Details of the attribution stage (microscope/stages/attribution.py): full precision in
`stages["attribution"]`, a variant's in `variants[fmt]["attribution"]`. They are
`microscope.attribution_eval.small(results)` plus the variant: the full results (with the pooled maps and
the per-token lists) are in the stage's results.json."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from schemas.details._base import StageDetails


class AttributionDetails(StageDetails):
    variant: str = Field(description="fp, or the quantized variant's produced format.")
    kind: Literal["images", "causal", "encoder"] = Field(
        description="images: a classifier's predicted class; causal: the predicted next token at the last position; "
        "encoder: the cosine of the mean-pooled embedding with the text's own clean embedding."
    )
    samples: list[int] = Field(description="Dataset indices (images or token windows) attributed, seeded.")
    methods: dict[str, Any] = Field(
        description="The settings that ran: ig_steps, ig_method, baseline (described), layer_steps, layer_baseline, "
        "target; images also smoothgrad_samples, smoothgrad_sigma (absolute) and the map shapes; text `tokens`."
    )
    per_sample: list[dict[str, Any]] = Field(
        description="Per sample: index, the target (images: label, predicted, logit; text: score, predicted token), "
        "gap F(x) − F(baseline) or score and baseline_score, the completeness delta and relative_delta; text "
        "also its top_tokens by |attribution| (maps and per-token lists are in results.json)."
    )
    layer_shares: dict[str, float] = Field(
        description="Block -> share of the summed |layer integrated gradients| (sums to 1; empty without blocks)."
    )
    randomisation: dict[str, Any] | None = Field(
        description="Adebayo et al.'s model-randomisation check (spearman, passed, meaning, method), or None "
        "(why: undefined['randomisation_spearman'])."
    )
    undefined: dict[str, str] = Field(description="Figures that are absent -> why.")
    figures: dict[str, float] = Field(
        description="Headline figures: samples, completeness_max_rel, completeness_mean_rel, randomisation_spearman, "
        "top_block_share, share_<block> (dots as underscores)."
    )
