"""Details of the robustness stage (microscope/stages/robustness.py): full precision in
`stages["robustness"]`, a variant's in `variants[fmt]["robustness"]`."""

from __future__ import annotations

from pydantic import Field

from schemas.details._base import Details, StageDetails


class AutoAttackResult(Details):
    """The reference AutoAttack at one norm (microscope/robustness/reference.py)."""

    omit_if_none = frozenset({"library"})

    norm: str
    eps: float = Field(description="ε on the attack surface (pixels, or the embedding box's units).")
    version: str = Field(description="AutoAttack's version setting: standard, plus, rand or custom.")
    library: str | None = Field(None, description="The library and its version (absent before robustness v2).")
    attacks: list[str]
    clean: float = Field(description="Clean accuracy on the samples.")
    robust: float = Field(description="Robust accuracy, as AutoAttack computes it.")
    robust_flags: list[bool] = Field(description="Per sample: still correct after the attacks.")
    per_attack: dict[str, float] = Field(description="Attack -> robust accuracy after it, as AutoAttack logged it.")
    flags: list[str] = Field(description="Warnings AutoAttack logged.")
    resumed: bool = Field(description="Read back from a finished evaluation's state, not run again.")
    eps_units: float = Field(description="ε in the data's units (the embedding box's scale for text).")


class Curves(Details):
    """Accuracy over ε: clean once, then PGD, FGSM and noise at each ε of robustness.sweep."""

    eps: list[float]
    pgd: list[float]
    fgsm: list[float]
    noise: list[float]
    clean: list[float] = Field(description="Clean accuracy (one value).")
    eps_units: list[float] = Field(description="Each ε in the data's units.")


class FeatureShift(Details):
    """An SAE feature whose activation moved most under attack."""

    feature: int
    mean_abs_shift: float
    clean_mean: float
    attacked_mean: float
    density: float = Field(description="Its density in the SAE stage (NaN when not in its table).")
    top_contexts: list[str] = Field(description="Its best contexts as 'left[token]right', at most 3.")


class RobustnessDetails(StageDetails):
    variant: str = Field(description="fp or the variant's format.")
    surface: str = Field(description="The attack surface: pixels or embeddings.")
    label: str = Field(description="What the targets are (classes, next token, ...).")
    eps: dict[str, float] = Field(description="Norm -> the AutoAttack ε used.")
    autoattack: list[AutoAttackResult]
    curves: Curves
    feature_shifts: dict[str, list[FeatureShift]] = Field(description="SAE hook -> features, most moved first.")
    layer_shifts: dict[str, float] = Field(description="Hook -> mean ‖h_adv − h‖ / ‖h‖ at the largest ε.")
