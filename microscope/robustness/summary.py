"""The robustness stage's summary figures, from the ε-sweep curves and the AutoAttack results.

Robust accuracy is meant relative to clean accuracy: it says how much of what the model gets right an
attack can break. With no sample classified correctly there is nothing to attack, so every accuracy
under attack (and anything compared with it) is undefined rather than a reassuring-looking 0.
"""

from __future__ import annotations

from typing import Any

from microscope.figures import Figure, Undefined

ATTACKS = ("pgd", "fgsm", "noise")


def no_clean_reason(n: int) -> str:
    return (
        f"clean accuracy is 0 on {n} samples: no correctly classified sample to attack, so accuracy under "
        "attack is undefined"
    )


def figures(curves: dict[str, list[float]], autoattack: list[dict[str, Any]], n: int) -> dict[str, Figure]:
    """clean_accuracy and samples; per norm autoattack_<norm> (robust accuracy); per sweep <attack>_min,
    the lowest accuracy over ε (for PGD and FGSM the accuracy at the largest ε: their curves only fall)."""
    clean = curves["clean"][0]
    out: dict[str, Figure] = {"clean_accuracy": clean, "samples": float(n)}
    why = Undefined(no_clean_reason(n)) if clean == 0 else None
    for r in autoattack:
        out[f"autoattack_{r['norm']}"] = why or float(r["robust"])
    for attack in ATTACKS:
        out[f"{attack}_min"] = why or (min(curves[attack]) if curves[attack] else clean)
    return out
