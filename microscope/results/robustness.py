"""Robustness: accuracy under the ε-sweeps, AutoAttack per norm, and the SAE features attacks move most."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from schemas.records import AuditRecord, StageRecord

from microscope.results.missing import number, variant_why_missing, why_missing

if TYPE_CHECKING:
    import pandas as pd

SWEEP_ATTACKS = ("pgd", "fgsm", "noise")


def _robustness_records(record: AuditRecord) -> dict[str, StageRecord]:
    out = {"fp": record.stages["robustness"]} if "robustness" in record.stages else {}
    return out | {v: recs["robustness"] for v, recs in sorted(record.variants.items()) if "robustness" in recs}


def robustness_curves(record: AuditRecord) -> pd.DataFrame:
    """Accuracy against ε, long form: `variant` (fp or a quantized variant), `attack` (pgd | fgsm | noise),
    `eps` (the sweep's, in box units), `accuracy`. `attrs["missing"]` says why a part is absent."""
    import pandas as pd

    missing: dict[str, str] = {}
    if (why := why_missing(record, "robustness")) is not None:
        missing["robustness"] = why
    missing |= variant_why_missing(record, "robustness")
    rows = []
    for v, r in _robustness_records(record).items():
        c = r.details.get("curves")
        if not c:
            continue
        for attack in SWEEP_ATTACKS:
            rows += [
                {"variant": v, "attack": attack, "eps": float(e), "accuracy": number(a)}
                for e, a in zip(c["eps"], c.get(attack) or [], strict=False)
            ]
    df = pd.DataFrame(rows, columns=["variant", "attack", "eps", "accuracy"])
    df.attrs["missing"] = missing
    return df


def autoattack_table(record: AuditRecord) -> pd.DataFrame:
    """The AutoAttack results: one row per (variant, norm): `variant`, `norm`, `eps`, `clean_accuracy`,
    `robust_accuracy`, `samples`, `version`, `attacks`, `flags` (pyautoattack's warnings, e.g. gradient
    masking), and `delta_vs_fp` (robust accuracy minus full precision's at that norm)."""
    import pandas as pd

    rows = []
    for v, r in _robustness_records(record).items():
        c = r.details.get("curves") or {}
        for a in r.details.get("autoattack") or []:
            rows.append(
                {
                    "variant": v,
                    "norm": a.get("norm"),
                    "eps": number(a.get("eps")),
                    "clean_accuracy": number((c.get("clean") or [math.nan])[0]),
                    "robust_accuracy": number(a.get("robust")),
                    "samples": int(r.metrics.get("samples", 0)),
                    "version": a.get("version"),
                    "attacks": ", ".join(a.get("attacks") or []),
                    "flags": "; ".join(a.get("flags") or []),
                }
            )
    cols = ["variant", "norm", "eps", "clean_accuracy", "robust_accuracy", "samples", "version", "attacks", "flags"]
    df = pd.DataFrame(rows, columns=cols)
    fp = {n: x for v, n, x in zip(df["variant"], df["norm"], df["robust_accuracy"], strict=True) if v == "fp"}
    df["delta_vs_fp"] = [x - fp.get(n, math.nan) for n, x in zip(df["norm"], df["robust_accuracy"], strict=True)]
    return df


def brittle_features(record: AuditRecord) -> pd.DataFrame:
    """SAE features whose activation moves most under attack (full precision): `hook`, `feature`,
    `mean_abs_shift`, `clean_mean`, `attacked_mean`, `density`, `top_context`; largest shift first."""
    import pandas as pd

    r = record.stages.get("robustness")
    rows = [
        {
            "hook": hook,
            "feature": int(f["feature"]),
            "mean_abs_shift": number(f.get("mean_abs_shift")),
            "clean_mean": number(f.get("clean_mean")),
            "attacked_mean": number(f.get("attacked_mean")),
            "density": number(f.get("density")),
            "top_context": (f.get("top_contexts") or [None])[0],
        }
        for hook, feats in ((r.details.get("feature_shifts") or {}) if r else {}).items()
        for f in feats
    ]
    cols = ["hook", "feature", "mean_abs_shift", "clean_mean", "attacked_mean", "density", "top_context"]
    df = pd.DataFrame(rows, columns=cols).sort_values("mean_abs_shift", ascending=False, kind="stable")
    df.attrs["missing"] = (
        {}
        if rows
        else {
            "robustness.features": "no brittle-feature list: it needs an SAE (trace,sae in --stages) and "
            "robustness.feature_shifts > 0"
        }
    )
    return df.reset_index(drop=True)
