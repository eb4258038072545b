"""Details of the reliability stage (microscope/stages/reliability.py): full precision in
`stages["reliability"]`, a variant's in `variants[fmt]["reliability"]`. The full results (the same content)
are in the stage's results.json."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from schemas.details._base import StageDetails


class ReliabilityDetails(StageDetails):
    omit_if_none = frozenset(
        {
            "n_fit",
            "n_eval",
            "n_windows_fit",
            "n_windows_eval",
            "calibration",
            "calibration_undefined",
            "temperature",
            "risk_coverage",
            "corruptions",
            "corruption_scores",
            "corruption_scores_published",
            "smoothing",
            "knn_k",
        }
    )

    variant: str = Field(description="fp, or the quantized variant's produced format.")
    n: int = Field(description="Samples the calibration figures are over (images, or next-token positions).")
    n_fit: int | None = Field(None, description="Of them, the split the temperature (and OOD statistics) fit on.")
    n_eval: int | None = Field(None, description="Of them, the split fitted figures are measured on.")
    n_windows_fit: int | None = Field(None, description="Text: windows of the fit split.")
    n_windows_eval: int | None = Field(None, description="Text: windows of the evaluation split (OOD: the ID set).")
    calibration: dict[str, Any] | None = Field(
        None, description="calibration_figures over all n: ECE, ACE, MCE, RMS-CE, NLL, Brier, the diagram."
    )
    calibration_undefined: str | None = Field(None, description="Why there is no calibration (an encoder).")
    temperature: dict[str, Any] | None = Field(
        None, description="The fitted temperature and the evaluation split's figures before and after it."
    )
    risk_coverage: dict[str, Any] | None = Field(None, description="Selective prediction: the curve and AURC.")
    ood: dict[str, dict[str, dict[str, Any]]] = Field(
        description="OOD set -> score -> detection figures (AUROC, AUPR, FPR95 both ways, ROC)."
    )
    ood_sets: dict[str, int] = Field(description="OOD set -> its samples (a name says how it was made).")
    knn_k: int | None = Field(None, description="The k of the k-NN score (reliability.knn_k or 0.1% of the fit split).")
    corruptions: dict[str, Any] | None = Field(
        None, description="Images: accuracy per corruption and severity, on `n` images, and the clean accuracy."
    )
    corruption_scores: dict[str, Any] | None = Field(
        None, description="Mean corruption accuracy; for a variant, corruption errors relative to full precision."
    )
    smoothing: dict[str, dict[str, Any]] | None = Field(
        None,
        description="Images, per σ: randomized-smoothing certificates (certified accuracy at radii, abstentions; "
        "the per-sample predictions and radii are in results.json).",
    )
    corruption_scores_published: dict[str, Any] | None = Field(
        None, description="Corruption errors relative to reliability.baseline_errors (e.g. AlexNet's), when given."
    )
