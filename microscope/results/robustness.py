"""Robustness: accuracy under the ε-sweeps, AutoAttack per norm, and the SAE features attacks move most."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from schemas.records import AuditRecord, StageRecord, StageStatus

from microscope.results.missing import number, variant_why_missing, why_missing

if TYPE_CHECKING:
    import pandas as pd

SWEEP_ATTACKS = ("pgd", "fgsm", "noise")


def _robustness_records(record: AuditRecord) -> dict[str, StageRecord]:
    return robustness_by_variant(record.stages.get("robustness"), record.variants)


def robustness_by_variant(
    fp: StageRecord | None, variants: Mapping[str, Mapping[str, StageRecord]]
) -> dict[str, StageRecord]:
    """The robustness records: full precision's first (`fp`, when given), then each variant's by name."""
    out = {"fp": fp} if fp is not None else {}
    return out | {v: recs["robustness"] for v, recs in sorted(variants.items()) if "robustness" in recs}


def robustness_overview(
    fp: StageRecord | None, variants: Mapping[str, Mapping[str, StageRecord]]
) -> dict[str, Any] | None:
    """What the robustness records say as a whole (None unless full precision's swept): `records` (as
    `robustness_by_variant`), `eps` (the sweep), `sweeps` ({attack: {variant: [(ε, accuracy)]}}, variants
    that failed before their sweep left out), from full precision's record `autoattack` (one entry per norm),
    `samples`, `surface`, `label`, `feature_shifts` ([{hook, total, features}], largest total first) and
    `layer_shifts` ([(hook, shift)], largest first). Takes the stage records: the report reads them while
    the audit runs, before an audit record exists."""
    if fp is None or not fp.details.get("curves"):
        return None
    recs = robustness_by_variant(fp, variants)
    base = fp.details
    sweeps: dict[str, dict[str, list[tuple[float, float]]]] = {a: {} for a in SWEEP_ATTACKS}
    for name, r in recs.items():
        c = r.details.get("curves")
        if not c:  # failed before its sweep
            continue
        for attack in sweeps:
            sweeps[attack][name] = list(zip(c["eps"], c[attack], strict=True))
    shifts = (
        {"hook": h, "total": sum(f["mean_abs_shift"] for f in feats), "features": feats}
        for h, feats in (base.get("feature_shifts") or {}).items()
    )
    return {
        "records": recs,
        "eps": base["curves"]["eps"],
        "sweeps": sweeps,
        "autoattack": base.get("autoattack", []),
        "samples": int(fp.metrics.get("samples", 0)),
        "surface": base.get("surface", ""),
        "label": base.get("label", ""),
        "feature_shifts": sorted(shifts, key=lambda h: -h["total"]),
        "layer_shifts": sorted((base.get("layer_shifts") or {}).items(), key=lambda kv: -kv[1]),
    }


def robustness_summary(name: str, r: StageRecord, fp: StageRecord) -> dict[str, Any]:
    """One variant's robustness figures: `variant`, and `error` alone when it failed before its sweep;
    else `figures` (`clean_accuracy`, `autoattack_<norm>`, and per sweep attack its accuracy at the largest
    ε), `undefined` (the record's reasons; an attack's curve is undefined for the reason its summary
    figure `<attack>_min` is), `vs_fp` (`autoattack_vs_fp`) and `flags` (AutoAttack's warnings)."""
    if r.status == StageStatus.failed and not r.details.get("curves"):
        return {"variant": name, "error": r.error}
    c = r.details["curves"]
    aa = r.details.get("autoattack", [])
    return {
        "variant": name,
        "figures": {
            "clean_accuracy": c["clean"][0],
            **{f"autoattack_{a['norm']}": a["robust"] for a in aa},
            **{attack: c[attack][-1] for attack in SWEEP_ATTACKS},
        },
        "undefined": r.undefined | {a: r.undefined[f"{a}_min"] for a in SWEEP_ATTACKS if f"{a}_min" in r.undefined},
        "vs_fp": autoattack_vs_fp(name, r, fp),
        "flags": sorted({f for a in aa for f in a.get("flags", [])}),
    }


def autoattack_vs_fp(name: str, r: StageRecord, fp: StageRecord) -> dict[str, Any] | None:
    """A variant's AutoAttack robust accuracy minus full precision's at its first norm, in points:
    {norm, key, points}, or {norm, key, reason} when either figure is undefined (points 0 where full
    precision has no such norm); None for full precision itself or without AutoAttack."""
    aa = {a["norm"]: a["robust"] for a in r.details.get("autoattack", [])}
    if name == "fp" or not aa:
        return None
    norm = next(iter(aa))
    key = f"autoattack_{norm}"
    why = r.undefined.get(key) or fp.undefined.get(key)
    if why:
        return {"norm": norm, "key": key, "reason": why}
    fp_aa = {a["norm"]: a["robust"] for a in fp.details.get("autoattack", [])}
    return {"norm": norm, "key": key, "points": 100 * (aa[norm] - fp_aa.get(norm, aa[norm]))}


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
