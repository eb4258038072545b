"""A training run: its audits by step, and its layers in one aligned projection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from microscope import audits
from microscope.results.layers import layer_table
from microscope.results.missing import HOW, why_missing
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import pandas as pd
    from schemas.records import AuditRecord


def run_series(store: ArtifactStore, run_id: str, layers: bool = False) -> pd.DataFrame:
    """A training run's audits in step order. One row per audit: `audit_id`, `step`, `status`,
    `created_at`, `model_digest` and every headline figure as `<source>.<figure>` (`metrics.alpha_mean`,
    `quantize[int8].kl_mean`, `sae[blocks.1.hook_resid_post].fvu`, ...; see `audits.headline`). With
    `layers`, one row per (audit, matrix): each audit's `layer_table` behind `audit_id` and `step`."""
    import pandas as pd

    records = audits.list_all(store, run_id=run_id)
    if not records:
        df = pd.DataFrame(columns=["audit_id", "step", "status", "created_at"])
        df.attrs["missing"] = {
            "run": f"no audit of run {run_id!r} in {store.uri}: microscope run --run-id {run_id} --step N ..."
        }
        return df
    lacking: dict[str, list[tuple[str, str]]] = {}  # stage -> [(audit id, why)]
    if layers:
        frames = []
        for r in records:
            t = layer_table(store, r)
            t.insert(0, "step", r.step)
            t.insert(0, "audit_id", r.audit_id)
            frames.append(t)
            for stage, why in t.attrs["missing"].items():
                lacking.setdefault(stage, []).append((r.audit_id, why))
        df = pd.concat(frames, ignore_index=True, sort=False)
    else:
        rows = []
        for r in records:
            row: dict[str, Any] = {
                "audit_id": r.audit_id,
                "step": r.step,
                "status": r.status.value,
                "created_at": r.created_at,
                "model_digest": r.model_digest,
            }
            for source, figs in audits.headline(r).items():
                row |= {f"{source}.{k}": v for k, v in figs.items()}
            rows.append(row)
            for stage in HOW:
                if (why := why_missing(r, stage)) is not None:
                    lacking.setdefault(stage, []).append((r.audit_id, why))
        df = pd.DataFrame(rows)
    df.attrs["missing"] = {
        stage: f"{len(found)} of {len(records)} audits lack it; the first, {found[0][1]}"
        for stage, found in lacking.items()
    }
    df.attrs["run_id"] = run_id
    return df


PROJECTION_FEATURES = (
    "log_frobenius",
    "log_spectral_norm",
    "rel_effective_rank",
    "rel_stable_rank",
    "alpha",
    "sparsity",
    "log_condition",
)


def layer_features(layers: pd.DataFrame) -> pd.DataFrame:
    """The scale-aware description of each weight matrix the projection uses (the statistics part of the
    Qdrant layer embedding, from the layer table): log norms, ranks relative to the matrix size, α,
    sparsity, log condition number. Rows as in `layers`; NaN where a statistic is undefined."""
    import numpy as np
    import pandas as pd

    def col(name: str) -> pd.Series:
        return layers[name].astype(float) if name in layers.columns else pd.Series(np.nan, index=layers.index)

    size = np.minimum(col("rows"), col("cols"))
    return pd.DataFrame(
        {
            "log_frobenius": np.log10(col("frobenius") + 1e-12),
            "log_spectral_norm": np.log10(col("spectral_norm") + 1e-12),
            "rel_effective_rank": col("effective_rank") / size,
            "rel_stable_rank": col("stable_rank") / size,
            "alpha": col("alpha"),
            "sparsity": col("sparsity"),
            "log_condition": np.log10(col("condition_number")),
        },
        index=layers.index,
    )


def run_projection(layers: pd.DataFrame, dims: int = 2) -> pd.DataFrame:
    """Every (step, matrix) of a run (`run_series(..., layers=True)`) projected on the run's principal
    components: one basis for all steps (each feature z-scored over the whole run, then PCA by SVD), so a
    matrix that did not change sits still and distance moved is change in its statistics. Columns: `step`,
    `audit_id`, `name`, `layer`, `role`, `pc1`..`pc<dims>`; `attrs["explained"]`: each component's share of
    the variance; `attrs["features"]`: the features used (constant or all-undefined ones are dropped)."""
    import numpy as np

    keep = ["step", "audit_id", "name", "layer", "role"]
    base = layers[[c for c in keep if c in layers.columns]].copy()
    if layers.empty or "frobenius" not in layers.columns:
        out = base.assign(**{f"pc{i + 1}": np.nan for i in range(dims)})
        out.attrs["explained"], out.attrs["features"] = [], []
        out.attrs["missing"] = {"metrics": "the projection needs weight statistics: " + HOW["metrics"]}
        return out
    feats = layer_features(layers)
    feats = feats.loc[:, feats.notna().any() & (feats.std(skipna=True) > 1e-12)]
    x = feats.to_numpy(dtype=np.float64)
    mean = np.nanmean(x, axis=0)
    x = np.where(np.isnan(x), mean, x)  # an undefined statistic sits at the run's mean
    z = (x - mean) / x.std(axis=0)
    k = min(dims, z.shape[1], max(len(z) - 1, 1))
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    vt = vt * np.where(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]  # sign: stable
    coords = z @ vt[:k].T
    for i in range(dims):
        base[f"pc{i + 1}"] = coords[:, i] if i < k else 0.0
    var = s**2
    base.attrs["explained"] = (var[:k] / var.sum()).tolist() if var.sum() > 0 else []
    base.attrs["features"] = list(feats.columns)
    base.attrs["missing"] = {}
    return base


def headline_compare(a: AuditRecord, b: AuditRecord) -> pd.DataFrame:
    """The two audits' summary figures side by side (`audits.headline`: every stage, variant and SAE), one row
    per figure both have (calibration, OOD, corruption, robustness, fidelity, ...), with B − A."""
    import pandas as pd

    ha, hb = audits.headline(a), audits.headline(b)
    rows = [
        {"source": src, "figure": k, "A": v, "B": hb[src][k], "B − A": hb[src][k] - v}
        for src, figs in ha.items()
        if src in hb
        for k, v in figs.items()
        if k in hb[src]
    ]
    return pd.DataFrame(rows, columns=["source", "figure", "A", "B", "B − A"])
