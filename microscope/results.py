"""Reading finished audits: the one API the HTML report, the Streamlit viewer and CI gates read through.

Prefect-free and read-only: everything comes from the artifact store (`audits/<id>.json` records and the
artifacts their stages list). Nothing here computes a stage. A partial or failed audit never raises: a
table lacks the columns a stage did not produce (none is fabricated) and `df.attrs["missing"]` maps the
stage (or `stage[variant]`, `metrics.sensitivity`, `metrics.cka`) to one line saying why and how to
produce it. Only a request for something that cannot exist raises `InputError` (an unknown audit id, a
feature index past the SAE's width).

    list_audits(store, run_id=None, model=None, status=None) -> list[AuditRef]   (record JSON only)
    load_audit(store, audit_id) -> AuditRecord                                   (= audits.load)
    manifest_digest(store, record) -> str     the cache key beside the audit id (st.cache_data)
    layer_table(store, record) -> DataFrame   one row per weight matrix, per-layer figures joined
    features(store, record, hook) -> DataFrame                  the SAE's features table
    feature_contexts(store, record, hook, feature) -> list[dict] a feature's top-activating contexts
    run_series(store, run_id, layers=False) -> DataFrame        a training run's audits by step

## layer_table: the grain is the weight matrix

Weight statistics, anomaly flags and curvature are defined per parameter tensor, and a block holds several
matrices (GPT-2: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj); aggregating them into one row per block
would invent a statistic (max? mean?) that no stage computed. So the table has one row per 2-D weight the
metrics stage measured (conv kernels as out × in·k·k), and the figures measured per traced (layer, hook)
point are joined on the block index and repeated on each matrix of that block (`df.groupby("layer")`
gives the per-block view; rows outside the blocks, `layer == -1`, have none). Without a metrics stage
there are no matrices: the rows are then the blocks themselves (`role == "block"`, `name` = the block's
module path from the architecture).

Columns (stable names; `<hook>` is resid | mlp | attn, `<v>` a quantized variant such as int8):

- identity: `name`, `layer` (block index, -1 outside the blocks), `role` (name inside the block, e.g.
  `mlp.c_fc`), `rows`, `cols` (the matrix's shape as measured).
- metrics, per matrix: `l1`, `frobenius`, `spectral_norm`, `condition_number`, `effective_rank`,
  `stable_rank`, `sparsity`, `alpha`, `alpha_weighted`, `xmin`, `ks_distance`, `mp_spikes`,
  `n_singular_values`, `spectrum` (exact | randomized); `anomaly` (bool), `anomalies` (list of the flagged
  columns: alpha, effective_rank, condition_number), `anomaly_reasons` (the record's flag texts); what the
  flags test, as numbers: `effective_rank_share` (effective rank / min(rows, cols)) and `condition_z` (the
  robust z-score of log10 condition number across the model's matrices).
- metrics sensitivity, per matrix: `grad_norm`, `fisher_trace`, `fisher_max`, `hessian_trace`,
  `hessian_trace_se` (NaN, with the reason, on a tied matrix such as GPT-2's lm_head: the sensitivity
  table names it by the parameter it is tied to).
- trace, per block: `act_mean_norm.<hook>`, `act_max_norm.<hook>`, `act_near_zero_frac.<hook>`.
- quantize, per block: `quant_cosine[<v>].<hook>`, `quant_rel_error[<v>].<hook>` (activation drift
  against full precision).
- sae, per block: `sae_fvu.<hook>`, `sae_l0.<hook>`, `sae_mse.<hook>`, `sae_dead_frac.<hook>`,
  `sae_dense_frac.<hook>`, `sae_ce_recovered.<hook>`; on each variant's activations `sae_fvu[<v>].<hook>`,
  `sae_l0[<v>].<hook>`.
- metrics CKA, per block: `cka_prev.<hook>`, `cka_next.<hook>` (to the neighbouring traced block's same
  hook), `cka[<v>].<hook>` (full precision against the variant).
- robustness, per block: `attack_shift.<hook>` (mean ‖h_adv − h‖/‖h‖ under PGD at the largest ε),
  `attack_shift[<v>].<hook>`.

Undefined figures (an α without a fit, a condition number on the randomized path, CE recovered when the
zero-ablation loss is not above the clean one) are NaN/None in the table and their reasons are in
`df.attrs["undefined"]`: {row name: {column: reason}}.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from schemas.config import canonical_hash
from schemas.gates import GateVerdict
from schemas.records import AuditRecord, StageRecord, StageStatus

from microscope import audits
from microscope.errors import InputError
from microscope.figures import is_number
from microscope.report import _hook_parts, _role
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import pandas as pd

load_audit = audits.load

WEIGHT_COLUMNS = (
    "l1",
    "frobenius",
    "spectral_norm",
    "condition_number",
    "effective_rank",
    "stable_rank",
    "sparsity",
    "alpha",
    "alpha_weighted",
    "xmin",
    "ks_distance",
    "mp_spikes",
    "n_singular_values",
    "spectrum",
)
SENSITIVITY_COLUMNS = ("grad_norm", "fisher_trace", "fisher_max", "hessian_trace", "hessian_trace_se")
TIED = (
    "no sensitivity row under this name: the matrix is tied to another parameter (e.g. lm_head to the token "
    "embedding), which the sensitivity table names by its parameter name and the weight table by its first "
    "state-dict name; the records do not say which"
)
FLAGGED_COLUMNS = ("alpha", "effective_rank", "condition_number")  # what metrics.flag() can flag
TRACE_FIGURES = {"mean_norm": "act_mean_norm", "max_norm": "act_max_norm", "near_zero_frac": "act_near_zero_frac"}
SAE_FIGURES = ("fvu", "l0", "mse", "dead_frac", "dense_frac", "ce_recovered")
SAE_VARIANT_FIGURES = ("fvu", "l0")
FEATURE_COLUMNS = (
    "feature",
    "density",
    "mean_activation",
    "max_activation",
    "top_context",
    "top_logits",
    "bottom_logits",
)

# How to produce what a stage would have added (the `--stages` list and the config key involved).
HOW = {
    "ingest": "run the audit again: ingest failed, so nothing after it ran",
    "quantize": "add quantize to --stages and list the variants in quantize.formats (e.g. [int8, nf4])",
    "trace": "add trace to --stages (trace.layers and trace.hooks choose the points)",
    "sae": "add trace,sae to --stages and list the traced hooks in sae.hooks (e.g. blocks.1.hook_resid_post)",
    "metrics": "add metrics to --stages",
    "robustness": "add robustness to --stages (the robustness section configures the attacks)",
    "report": "add report to --stages",
}


# ---- the audit index --------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRef:
    """An audit as the index lists it: what a picker shows, without the stage details."""

    audit_id: str
    run_id: str | None
    step: int | None
    status: str
    created_at: datetime
    model_source: str
    digest: str | None  # the weights' digest (None when ingest failed)


def list_audits(
    store: ArtifactStore, run_id: str | None = None, model: str | None = None, status: str | None = None
) -> list[AuditRef]:
    """Every audit in the store, oldest first; with `run_id` that run's in step order. `model` matches a
    substring of the checkpoint's source or a prefix of its digest; `status` the audit's status."""
    out = []
    for key in store.list("audits"):
        if not key.endswith(".json") or key.count("/") != 1:
            continue
        raw = json.loads(store.get_bytes(key))  # plain JSON: no validation of the (large) stage details
        ref = AuditRef(
            audit_id=raw["audit_id"],
            run_id=raw.get("run_id"),
            step=raw.get("step"),
            status=str(raw["status"]),
            created_at=datetime.fromisoformat(raw["created_at"]),
            model_source=(raw.get("model") or {}).get("source", ""),
            digest=raw.get("model_digest"),
        )
        if run_id is not None and ref.run_id != run_id:
            continue
        if model is not None and model not in ref.model_source and not (ref.digest or "").startswith(model):
            continue
        if status is not None and ref.status != str(status):
            continue
        out.append(ref)
    if run_id is not None:
        return sorted(out, key=lambda r: (r.step if r.step is not None else -1, r.created_at))
    return sorted(out, key=lambda r: r.created_at)


def _all_records(record: AuditRecord) -> list[tuple[str, StageRecord]]:
    out = list(record.stages.items())
    out += [(f"{s}[{v}]", r) for v, recs in sorted(record.variants.items()) for s, r in sorted(recs.items())]
    out += [(f"sae[{h}]", r) for h, r in sorted(record.saes.items())]
    return out


def manifest_digest(store: ArtifactStore, record: AuditRecord) -> str:
    """A short hash of what the audit's results are made of (each stage's status, config hash and
    manifest): changes whenever a stage finishes or is recomputed. The viewer's cache key beside the id."""
    del store  # the record names everything; kept for a uniform signature (a later version may read manifests)
    parts = {
        name: [r.status.value, r.config_hash, r.artifacts.get("manifest"), r.error] for name, r in _all_records(record)
    }
    return canonical_hash({"audit": record.audit_id, "status": record.status.value, "stages": parts}, length=12)


# ---- why something is missing -----------------------------------------------------------------


def _why(record: AuditRecord, stage: str) -> str | None:
    """None when `stage` finished (completed, cached or partial); else one line: why, and how to get it."""
    rec = record.stages.get(stage)
    if rec is None or rec.status == StageStatus.skipped:
        reason = rec.details.get("reason", "not run") if rec else "not in this audit's record"
        return f"{stage} did not run in audit {record.audit_id} ({reason}): {HOW[stage]}"
    if rec.status == StageStatus.failed:
        return (
            f"{stage} failed in audit {record.audit_id}: {rec.error or 'no error recorded'} "
            f"(traceback: audits/{record.audit_id}/{stage}.log in the store); fix it and run the audit again"
        )
    return None


def _variant_why(record: AuditRecord, stage: str) -> dict[str, str]:
    """`stage[v]` → reason for each variant whose `stage` failed."""
    return {
        f"{stage}[{v}]": f"{stage}[{v}] failed: {r.error or 'no error recorded'} "
        f"(traceback: audits/{record.audit_id}/{stage}[{v}].log in the store)"
        for v, recs in sorted(record.variants.items())
        if (r := recs.get(stage)) is not None and r.status == StageStatus.failed
    }


# ---- the joined per-layer table ---------------------------------------------------------------


def _num(v: Any) -> float:
    return float(v) if is_number(v) else math.nan


def _per_block(record: AuditRecord, missing: dict[str, str]) -> dict[int, dict[str, Any]]:
    """Figures measured per traced (layer, hook), keyed by block: {layer: {column: value}}."""
    blocks: dict[int, dict[str, Any]] = {}

    def put(hook_name: str, column: str, value: Any) -> None:
        layer, hook = _hook_parts(hook_name)
        blocks.setdefault(layer, {})[f"{column}.{hook}"] = value

    trace = record.stages.get("trace")
    if (why := _why(record, "trace")) is not None:
        missing["trace"] = why
    elif trace is not None:
        for hook_name, d in (trace.details.get("datasets") or {}).items():
            for stat, column in TRACE_FIGURES.items():
                if stat in (d.get("stats") or {}):
                    put(hook_name, column, _num(d["stats"][stat]))

    if (why := _why(record, "quantize")) is not None:
        missing["quantize"] = why
    elif not record.variants:
        missing["quantize"] = f"quantize made no variant: {HOW['quantize']}"
    missing |= _variant_why(record, "quantize")
    for v, recs in sorted(record.variants.items()):
        q = recs.get("quantize")
        for hook_name, drift in ((q.details.get("drift") or {}) if q else {}).items():
            put(hook_name, f"quant_cosine[{v}]", _num(drift.get("cosine")))
            put(hook_name, f"quant_rel_error[{v}]", _num(drift.get("rel_error")))

    if (why := _why(record, "sae")) is not None:
        missing["sae"] = why
    elif not record.saes:
        missing["sae"] = f"no SAE was trained: {HOW['sae']}"
    for hook_name, r in sorted(record.saes.items()):
        if r.status == StageStatus.failed:
            missing[f"sae[{hook_name}]"] = f"the SAE on {hook_name} failed: {r.error or 'no error recorded'}"
            continue
        for fig in SAE_FIGURES:
            if fig in r.metrics:
                put(hook_name, f"sae_{fig}", float(r.metrics[fig]))
        for v, vm in sorted((r.details.get("variants") or {}).items()):
            for fig in SAE_VARIANT_FIGURES:
                if fig in vm:
                    put(hook_name, f"sae_{fig}[{v}]", _num(vm[fig]))

    metrics = record.stages.get("metrics")
    cka = (metrics.details.get("cka") or {}) if metrics and _why(record, "metrics") is None else {}
    if metrics is not None and _why(record, "metrics") is None and not cka.get("layers"):
        missing["metrics.cka"] = "CKA needs traced activations: add trace to --stages before metrics"
    names = cka.get("layers") or []
    matrix = cka.get("matrix") or []
    by_hook: dict[str, list[tuple[int, int]]] = {}  # hook kind -> [(layer, index in the matrix)] by layer
    for i, hook_name in enumerate(names):
        layer, hook = _hook_parts(hook_name)
        by_hook.setdefault(hook, []).append((layer, i))
    for hook, points in by_hook.items():
        points.sort()
        for j, (layer, i) in enumerate(points):
            row = blocks.setdefault(layer, {})
            if j > 0:
                row[f"cka_prev.{hook}"] = _num(matrix[i][points[j - 1][1]])
            if j + 1 < len(points):
                row[f"cka_next.{hook}"] = _num(matrix[i][points[j + 1][1]])
    for v, per_hook in sorted((cka.get("variants") or {}).items()):
        for hook_name, value in per_hook.items():
            put(hook_name, f"cka[{v}]", _num(value))

    rob = record.stages.get("robustness")
    if (why := _why(record, "robustness")) is not None:
        missing["robustness"] = why
    elif rob is not None and not rob.details.get("layer_shifts"):
        missing["robustness"] = "robustness recorded no per-layer shift (it needs traced activations and a sweep)"
    missing |= _variant_why(record, "robustness")
    sources = [("", rob)] + [(f"[{v}]", recs.get("robustness")) for v, recs in sorted(record.variants.items())]
    for suffix, r in sources:
        for hook_name, value in ((r.details.get("layer_shifts") or {}) if r else {}).items():
            put(hook_name, f"attack_shift{suffix}", _num(value))
    return blocks


def _matrix_rows(record: AuditRecord, missing: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per weight matrix from the metrics record (its `weights` and `sensitivity` details)."""
    undefined: dict[str, Any] = {}
    metrics = record.stages.get("metrics")
    if (why := _why(record, "metrics")) is not None or metrics is None or not metrics.details.get("weights"):
        missing["metrics"] = why or f"metrics recorded no weight statistics: {HOW['metrics']}"
        return [], undefined
    sens = {r["name"]: r for r in metrics.details.get("sensitivity") or []}
    if not sens:
        missing["metrics.sensitivity"] = "no Fisher/Hutchinson figures: set metrics.sensitivity: true"
    rows = []
    for w in sorted(metrics.details["weights"], key=lambda r: (r["layer"], r["name"])):
        shape = w.get("shape") or [None, None]
        row: dict[str, Any] = {
            "name": w["name"],
            "layer": int(w["layer"]),
            "role": _role(w["name"]),
            "rows": shape[0],
            "cols": math.prod(shape[1:]) if len(shape) > 1 else None,
        }
        for col in WEIGHT_COLUMNS:
            if col in w:
                row[col] = w[col] if col == "spectrum" else _num(w[col])
        flags = list(w.get("flags") or [])
        row["anomaly"] = bool(flags)
        row["anomalies"] = sorted({c for f in flags for c in FLAGGED_COLUMNS if f.startswith(c.replace("_", " "))})
        row["anomaly_reasons"] = flags
        if w.get("undefined"):
            undefined[w["name"]] = dict(w["undefined"])
        if sens:
            s = sens.get(w["name"], {})
            for col in SENSITIVITY_COLUMNS:
                row[col] = _num(s.get(col))
            if not s:  # a tied matrix: the weight table names it by its first state-dict name
                undefined.setdefault(w["name"], {}).update(dict.fromkeys(SENSITIVITY_COLUMNS, TIED))
        rows.append(row)
    return rows, undefined


def _block_rows(record: AuditRecord, layers: set[int]) -> list[dict[str, Any]]:
    """Without weight statistics: one row per block, named by its module path where the architecture
    says it."""
    paths = {p.layer: p.resid for p in (record.architecture.hook_points if record.architecture else [])}
    return [
        {"name": paths.get(layer, f"block {layer}"), "layer": layer, "role": "block"}
        for layer in sorted(layers | set(paths))
    ]


def layer_table(store: ArtifactStore, record: AuditRecord) -> pd.DataFrame:
    """The joined per-layer table (see the module docstring for its grain and columns)."""
    import pandas as pd

    del store  # every figure joined here is in the record's details (the same rows as the artifacts)
    missing: dict[str, str] = {}
    if (why := _why(record, "ingest")) is not None:
        missing["ingest"] = why
    rows, undefined = _matrix_rows(record, missing)
    blocks = _per_block(record, missing)
    if not rows:
        rows = _block_rows(record, set(blocks))
    hook_cols = sorted({c for b in blocks.values() for c in b}, key=_column_order)
    for row in rows:
        per = blocks.get(row["layer"], {})
        for col in hook_cols:
            row[col] = per.get(col, math.nan)
    for hook_name, r in record.saes.items():  # SAE figures a record says are undefined, on their block
        layer, hook = _hook_parts(hook_name)
        for fig, reason in r.undefined.items():
            if fig in SAE_FIGURES:
                for row in rows:
                    if row["layer"] == layer:
                        undefined.setdefault(row["name"], {})[f"sae_{fig}.{hook}"] = reason
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(c for row in rows for c in row)) or ["name", "layer", "role"])
    _derived(df)
    df.attrs["missing"] = missing
    df.attrs["undefined"] = undefined
    df.attrs["audit_id"] = record.audit_id
    return df


def _derived(df: pd.DataFrame) -> None:
    """The quantities the metrics stage's anomaly flags test, as columns (so gate rules can state them):
    `effective_rank_share` = effective rank / min(rows, cols), and `condition_z`, the robust z-score
    0.6745·(x − median)/MAD of x = log10 max(condition number, 1) across the model's matrices."""
    import numpy as np

    if "effective_rank" in df.columns:
        idx = df.columns.get_loc("effective_rank") + 1
        df.insert(idx, "effective_rank_share", df["effective_rank"] / np.minimum(df["rows"], df["cols"]))
    if "condition_number" in df.columns:
        x = np.log10(np.maximum(df["condition_number"].astype(float), 1.0))
        finite = x[np.isfinite(x)]
        med = float(np.median(finite)) if len(finite) else 0.0
        mad = float(np.median(np.abs(finite - med))) if len(finite) else 0.0
        df.insert(df.columns.get_loc("condition_number") + 1, "condition_z", 0.6745 * (x - med) / (mad or 1e-12))


_GROUPS = ("act_", "quant_", "sae_", "cka", "attack_")


def _column_order(col: str) -> tuple[int, str, str]:
    """Per-block columns grouped by stage, then by hook kind, then by name."""
    base, _, hook = col.rpartition(".")
    group = next((i for i, g in enumerate(_GROUPS) if base.startswith(g)), len(_GROUPS))
    return group, hook, base


# ---- SAE features -----------------------------------------------------------------------------


def _key(store: ArtifactStore, uri: str) -> str:
    """The store key of an artifact URI (records hold URIs; the store reads keys)."""
    root = store.uri_for("x")[:-1]
    return uri[len(root) :] if uri.startswith(root) else uri


def _sae_features_key(store: ArtifactStore, record: AuditRecord, hook: str) -> tuple[str | None, str | None]:
    """(features.parquet key, None) or (None, why it is missing)."""
    r = record.saes.get(hook)
    if r is None:
        why = _why(record, "sae")
        if why is None:
            trained = ", ".join(sorted(record.saes)) or "none"
            why = f"no SAE on {hook} in audit {record.audit_id} (SAEs: {trained}); add it to sae.hooks"
        return None, why
    if r.status == StageStatus.failed:
        return None, f"the SAE on {hook} failed: {r.error or 'no error recorded'}; fix it and run the audit again"
    key = f"{r.details['prefix']}/features.parquet" if r.details.get("prefix") else None
    if key is None and "features" in r.artifacts:
        key = _key(store, r.artifacts["features"])
    if key is None or not store.exists(key):
        return None, f"the features table of the SAE on {hook} is not in {store.uri}: run the audit's sae stage again"
    return key, None


def features(store: ArtifactStore, record: AuditRecord, hook: str) -> pd.DataFrame:
    """The SAE's features table, one row per latent: `feature`, `density` (firing fraction over every
    traced token), `mean_activation` (mean when firing), `max_activation` and `top_context` (its best
    context as `left[token]right`), and where the model has an unembedding `top_logits`/`bottom_logits`
    (tokens its decoder direction raises/lowers); per quantized variant `v` the feature's firing density on
    the variant's activations `density[v]` and the correlation of its activations with full precision's on
    the same tokens `corr[v]` (audits made before these were recorded lack them). The contexts themselves:
    `feature_contexts`."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    key, why = _sae_features_key(store, record, hook)
    if key is None:
        df = pd.DataFrame(columns=list(FEATURE_COLUMNS))
        df.attrs["missing"] = {"sae": why}
        return df
    table = pq.read_table(store.local_path(key))
    out = {c: table.column(c).to_numpy() for c in ("feature", "density", "mean_activation")}
    ctx = table.column("top_contexts").combine_chunks()
    offsets = ctx.offsets.to_numpy()
    lengths, starts = np.diff(offsets), offsets[:-1] - offsets[0]
    flat = ctx.flatten()
    has = lengths > 0
    first = np.where(has, starts, 0)
    if len(flat):  # contexts are stored best first
        act = flat.field("activation").to_numpy(zero_copy_only=False).astype(np.float64)
        left, tok, right = (flat.field(f).to_numpy(zero_copy_only=False) for f in ("left", "token", "right"))
        out["max_activation"] = np.where(has, act[first], np.nan)
        out["top_context"] = [f"{left[i]}[{tok[i]}]{right[i]}" if h else None for i, h in zip(first, has, strict=True)]
    else:
        out["max_activation"] = np.full(len(has), np.nan)
        out["top_context"] = [None] * len(has)
    for col in ("top_logits", "bottom_logits"):
        if col in table.column_names:
            out[col] = table.column(col).to_pylist()
    fate = [c for c in table.column_names if c.startswith(("density[", "corr["))]  # per quantized variant
    for col in fate:
        out[col] = table.column(col).to_numpy()
    df = pd.DataFrame(out, columns=[c for c in FEATURE_COLUMNS if c in out] + fate)
    df.attrs["missing"] = {} if "top_logits" in out else {"sae.top_logits": "the model has no unembedding"}
    df.attrs["hook"] = hook
    return df


def feature_contexts(store: ArtifactStore, record: AuditRecord, hook: str, feature: int) -> list[dict[str, Any]]:
    """The feature's top-activating contexts, best first: `left`, `token`, `right` (text), `activation` (at
    the token), `window` and `position` (where in the ingested token windows), and, from audits whose sae
    stage recorded them, `tokens` (each token of the context), `activations` (the feature's activation at
    each, NaN where a token was not traced) and `center` (the index of the top token). Empty when the audit
    has no such SAE."""
    import pyarrow.parquet as pq

    key, _ = _sae_features_key(store, record, hook)
    if key is None:
        return []
    d_sae = pq.ParquetFile(store.local_path(key)).metadata.num_rows
    if not 0 <= feature < d_sae:
        raise InputError(f"feature {feature} is outside the SAE on {hook} (features 0 to {d_sae - 1})")
    t = pq.read_table(store.local_path(key), columns=["feature", "top_contexts"], filters=[("feature", "==", feature)])
    rows = t.column("top_contexts").to_pylist()
    return [dict(c) for c in rows[0]] if rows else []


# ---- a training run ---------------------------------------------------------------------------


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
                if (why := _why(r, stage)) is not None:
                    lacking.setdefault(stage, []).append((r.audit_id, why))
        df = pd.DataFrame(rows)
    df.attrs["missing"] = {
        stage: f"{len(found)} of {len(records)} audits lack it; the first, {found[0][1]}"
        for stage, found in lacking.items()
    }
    df.attrs["run_id"] = run_id
    return df


# ---- architecture and memory ------------------------------------------------------------------

BYTES = {"float32": 4.0, "float64": 8.0, "float16": 2.0, "bfloat16": 2.0}


def module_table(record: AuditRecord) -> pd.DataFrame:
    """The architecture's modules as a tree: `name`, `parent` (the enclosing listed module, "" at the
    top), `depth`, `type`, `params`, `share` (of the model's parameters). Empty, with `attrs["missing"]`,
    when ingest did not record an architecture."""
    import pandas as pd

    arch = record.architecture
    if arch is None:
        df = pd.DataFrame(columns=["name", "parent", "depth", "type", "params", "share"])
        df.attrs["missing"] = {"ingest": _why(record, "ingest") or "ingest recorded no architecture"}
        return df
    names = {m.name for m in arch.modules}
    rows = []
    for m in arch.modules:
        parts = m.name.split(".")
        parent = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in names), "")
        rows.append({"name": m.name, "parent": parent, "type": m.type, "params": m.params})
    depth: dict[str, int] = {}
    for r in rows:  # parents come before their children in the architecture's module list
        r["depth"] = depth[r["name"]] = depth.get(r["parent"], -1) + 1 if r["parent"] else 0
        r["share"] = r["params"] / arch.n_params if arch.n_params else math.nan
    df = pd.DataFrame(rows, columns=["name", "parent", "depth", "type", "params", "share"])
    df.attrs["missing"] = {}
    return df


def memory_table(record: AuditRecord, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Weight memory per block (`layer`, -1 for everything outside the blocks) in full precision and in each
    quantized variant the audit made, in bytes: `bytes[fp]`, `bytes[<v>]`. A matrix inside a block is stored
    in the variant's format (its bytes per weight from `microscope.quantization.FORMATS`, scales included);
    matrices outside the blocks (embeddings, heads) stay at the model's dtype, as transformers' quantizers
    leave them. Biases and norms are not in the table (`metrics` measures 2-D weights only), so the column
    sums are a lower bound of the quantize stage's `measured_bytes`, kept in `attrs["measured"]`."""
    import pandas as pd

    from microscope.quantization import FORMATS

    t = table if table is not None else layer_table(None, record)  # type: ignore[arg-type]
    if "rows" not in t.columns or t.empty or t["rows"].isna().all():
        df = pd.DataFrame(columns=["layer", "matrices", "params", "bytes[fp]"])
        df.attrs["missing"] = {"metrics": t.attrs.get("missing", {}).get("metrics", HOW["metrics"])}
        df.attrs["measured"] = {}
        return df
    fp_bytes = BYTES.get(record.architecture.dtype if record.architecture else "float32", 4.0)
    produced = {
        v: recs["quantize"].details.get("produced", v)
        for v, recs in sorted(record.variants.items())
        if "quantize" in recs and recs["quantize"].status != StageStatus.failed
    }
    rows = []
    for layer, g in t.groupby("layer", sort=True):
        n = (g["rows"] * g["cols"]).astype(float)
        row: dict[str, Any] = {"layer": int(layer), "matrices": len(g), "params": int(n.sum())}
        row["bytes[fp]"] = float(n.sum() * fp_bytes)
        for v, fmt in produced.items():
            f = FORMATS.get(fmt)
            if f is None or layer < 0:
                row[f"bytes[{v}]"] = float(n.sum() * (f.other_bytes if f and fp_bytes > f.other_bytes else fp_bytes))
            else:
                row[f"bytes[{v}]"] = float(
                    sum(o * i * f.quantized_bytes(int(i)) for o, i in zip(g["rows"], g["cols"], strict=True))
                )
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["missing"] = {}
    df.attrs["measured"] = {
        v: recs["quantize"].metrics.get("measured_bytes")
        for v, recs in record.variants.items()
        if "quantize" in recs and "measured_bytes" in recs["quantize"].metrics
    }
    if record.variants:
        fp = next(iter(record.variants.values())).get("quantize")
        if fp is not None and "fp_bytes" in fp.metrics:
            df.attrs["measured"]["fp"] = fp.metrics["fp_bytes"]
    return df


# ---- quantization -----------------------------------------------------------------------------

QUANT_FIGURES = ("kl_mean", "kl_p99", "top1_agreement", "delta_ppl", "ppl_fp", "ppl_q", "accuracy_fp", "accuracy_q")


def quantization_table(record: AuditRecord) -> pd.DataFrame:
    """One row per quantized variant: `variant`, `status`, `requested`, `produced`, `fell_back`, the
    fidelity figures the stage recorded (KL, top-1 agreement, Δ perplexity, or accuracy for classifiers;
    each column present only where some variant has it, undefined ones NaN with their reasons in
    `attrs["undefined"]`), memory (`measured_bytes`, `fp_bytes`, `memory_ratio`), `most_drifting_hook`
    and `error`. `attrs["missing"]` says why there is no variant."""
    import pandas as pd

    missing: dict[str, str] = {}
    if (why := _why(record, "quantize")) is not None:
        missing["quantize"] = why
    elif not record.variants:
        missing["quantize"] = f"quantize made no variant: {HOW['quantize']}"
    undefined: dict[str, dict[str, str]] = {}
    rows = []
    for v, recs in sorted(record.variants.items()):
        q = recs.get("quantize")
        if q is None:
            continue
        row: dict[str, Any] = {
            "variant": v,
            "status": q.status.value,
            "requested": q.details.get("requested", v),
            "produced": q.details.get("produced"),
            "fell_back": bool(q.details.get("fell_back", False)),
        }
        row |= {k: float(x) for k, x in q.metrics.items() if k not in ("estimated_bytes", "on_disk_bytes")}
        if row.get("fp_bytes") and row.get("measured_bytes"):
            row["memory_ratio"] = row["measured_bytes"] / row["fp_bytes"]
        row["most_drifting_hook"] = q.details.get("most_drifting_hook")
        row["error"] = q.error
        if q.undefined:
            undefined[v] = dict(q.undefined)
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["missing"] = missing
    df.attrs["undefined"] = undefined
    return df


def drift_table(record: AuditRecord) -> pd.DataFrame:
    """Activation drift of each variant against full precision, per traced point: `variant`, `hook`,
    `layer`, `kind` (resid | mlp | attn), `cosine`, `rel_error`; sorted by variant and layer."""
    import pandas as pd

    rows = []
    for v, recs in sorted(record.variants.items()):
        q = recs.get("quantize")
        for hook_name, d in ((q.details.get("drift") or {}) if q else {}).items():
            layer, kind = _hook_parts(hook_name)
            rows.append(
                {
                    "variant": v,
                    "hook": hook_name,
                    "layer": layer,
                    "kind": kind,
                    "cosine": _num(d.get("cosine")),
                    "rel_error": _num(d.get("rel_error")),
                }
            )
    df = pd.DataFrame(rows, columns=["variant", "hook", "layer", "kind", "cosine", "rel_error"])
    return df.sort_values(["variant", "layer", "kind"], kind="stable").reset_index(drop=True)


# ---- robustness -------------------------------------------------------------------------------

SWEEP_ATTACKS = ("pgd", "fgsm", "noise")


def _robustness_records(record: AuditRecord) -> dict[str, StageRecord]:
    out = {"fp": record.stages["robustness"]} if "robustness" in record.stages else {}
    return out | {v: recs["robustness"] for v, recs in sorted(record.variants.items()) if "robustness" in recs}


def robustness_curves(record: AuditRecord) -> pd.DataFrame:
    """Accuracy against ε, long form: `variant` (fp or a quantized variant), `attack` (pgd | fgsm | noise),
    `eps` (the sweep's, in box units), `accuracy`. `attrs["missing"]` says why a part is absent."""
    import pandas as pd

    missing: dict[str, str] = {}
    if (why := _why(record, "robustness")) is not None:
        missing["robustness"] = why
    missing |= _variant_why(record, "robustness")
    rows = []
    for v, r in _robustness_records(record).items():
        c = r.details.get("curves")
        if not c:
            continue
        for attack in SWEEP_ATTACKS:
            rows += [
                {"variant": v, "attack": attack, "eps": float(e), "accuracy": _num(a)}
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
                    "eps": _num(a.get("eps")),
                    "clean_accuracy": _num((c.get("clean") or [math.nan])[0]),
                    "robust_accuracy": _num(a.get("robust")),
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
            "mean_abs_shift": _num(f.get("mean_abs_shift")),
            "clean_mean": _num(f.get("clean_mean")),
            "attacked_mean": _num(f.get("attacked_mean")),
            "density": _num(f.get("density")),
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


def variant_fate(density_fp: float, density_v: float, corr: float) -> str:
    """A feature's fate on a quantized variant's activations (same SAE, same tokens): `survived` (its
    activations correlate ≥ 0.9 with full precision's), `drifted` (≥ 0.5), `lost` (it stops firing, or
    fires unrelated to where it fired); `dead` when it never fires in full precision either."""
    if not density_fp > 0:
        return "dead"
    if not density_v > 0 or not math.isfinite(corr):
        return "lost"
    from microscope.feature_matching import RELATED, SURVIVED  # the bounds of the matches across checkpoints

    return "survived" if corr >= SURVIVED else "drifted" if corr >= RELATED else "lost"


def feature_fate(store: ArtifactStore, record: AuditRecord, hook: str, feature: int) -> pd.DataFrame:
    """`feature` of the SAE on `hook` followed through its training run, by the one-to-one decoder matches
    stored between consecutive checkpoints (each audit matches itself against the run's previous one when
    it ends; `microscope match A B` makes any other pair). One row per step, in step order: `step`,
    `audit_id`, `feature` (its counterpart there), `cosine` (to the counterpart one step closer to this
    audit), `label` (survived | drifted | split | lost | new, seen from the earlier step; `this audit` on
    its own row). Following stops where the feature is lost (going forward) or new (going back), or where
    no match was stored (`attrs["missing"]` says which pair and how to make it)."""
    import pandas as pd

    from microscope import feature_matching as fm

    cols = ["step", "audit_id", "feature", "cosine", "label", "split_into"]
    missing: dict[str, str] = {}
    refs = [r for r in list_audits(store, run_id=record.run_id) if r.step is not None] if record.run_id else []
    by_step = {r.step: r for r in refs}  # the latest audit of a step stands for it
    if record.step is not None:
        by_step[record.step] = next(r for r in refs if r.audit_id == record.audit_id)
    chain = [by_step[s] for s in sorted(by_step)]
    here = next((i for i, r in enumerate(chain) if r.audit_id == record.audit_id), None)
    rows: list[dict[str, Any]] = []
    if here is None or len(chain) < 2:
        df = pd.DataFrame(rows, columns=cols)
        df.attrs["missing"] = {"run": f"audit {record.audit_id} has no other checkpoint of its run with a step"}
        return df
    rows.append(
        {
            "step": record.step,
            "audit_id": record.audit_id,
            "feature": feature,
            "cosine": 1.0,
            "label": "this audit",
            "split_into": [],
        }
    )

    def lacking(a: AuditRef, b: AuditRef) -> None:
        missing[f"matches {a.step}→{b.step}"] = (
            f"no stored feature matches between audits {a.audit_id} (step {a.step}) and {b.audit_id} (step "
            f"{b.step}) on {hook}: `microscope match {a.audit_id} {b.audit_id} --hook {hook}` makes them"
        )

    cur: int | None = feature
    for a, b in zip(chain[here:], chain[here + 1 :], strict=False):  # forward: what it became
        m = fm.load_matches(store, a.audit_id, b.audit_id, hook)
        if m is None:
            lacking(a, b)
            break
        t = m.features.to_pandas().set_index("feature_a")
        r = t.loc[cur]
        partner = int(r["feature_b"])
        split = [int(x) for x in (r["split_into"] if r["split_into"] is not None else [])]
        rows.append(
            {
                "step": b.step,
                "audit_id": b.audit_id,
                "feature": partner if partner >= 0 else None,
                "cosine": float(r["cosine"]),
                "label": str(r["label"]),
                "split_into": split,
            }
        )
        if r["label"] in ("lost", "split") or partner < 0:
            break
        cur = partner
    cur = feature
    for a, b in reversed(list(zip(chain[:here], chain[1 : here + 1], strict=False))):  # back: where it came from
        m = fm.load_matches(store, a.audit_id, b.audit_id, hook)
        if m is None:
            lacking(a, b)
            break
        t = m.features.to_pandas()
        hit = t[t["feature_b"] == cur]
        if hit.empty or hit.iloc[0]["label"] == "lost":
            rows.append(
                {
                    "step": a.step,
                    "audit_id": a.audit_id,
                    "feature": None,
                    "cosine": math.nan,
                    "label": f"new at step {b.step}",
                    "split_into": [],
                }
            )
            break
        r = hit.iloc[0]
        rows.append(
            {
                "step": a.step,
                "audit_id": a.audit_id,
                "feature": int(r["feature_a"]),
                "cosine": float(r["cosine"]),
                "label": str(r["label"]),
                "split_into": [],
            }
        )
        cur = int(r["feature_a"])
    df = pd.DataFrame(rows, columns=cols).sort_values("step", kind="stable").reset_index(drop=True)
    df.attrs["missing"] = missing
    return df


# ---- a run's layers in one aligned projection --------------------------------------------------

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


# ---- gates ------------------------------------------------------------------------------------


def gate_verdict(record: AuditRecord) -> GateVerdict | None:
    """The verdict the audit's gate stage recorded (None without one: no `gate.rules`, or it failed)."""
    g = record.stages.get("gate")
    if g is None or g.status not in (StageStatus.completed, StageStatus.cached) or not g.details.get("results"):
        return None
    return GateVerdict.model_validate(g.details)


def gate_history(store: ArtifactStore, run_id: str) -> pd.DataFrame:
    """Every gated audit of a run, long form: `step`, `audit_id`, `rule`, `outcome`, `compared`, `offenders`
    (the first five keys), in step order; `attrs["first_failed"]`: rule -> the first step it failed at."""
    import pandas as pd

    rows = []
    for rec in audits.list_all(store, run_id=run_id):
        v = gate_verdict(rec)
        if v is None or rec.step is None:
            continue
        rows += [
            {
                "step": rec.step,
                "audit_id": rec.audit_id,
                "rule": r.rule,
                "outcome": r.outcome,
                "compared": r.compared,
                "offenders": ", ".join(o.key for o in r.offenders[:5]),
            }
            for r in v.results
        ]
    df = pd.DataFrame(rows, columns=["step", "audit_id", "rule", "outcome", "compared", "offenders"])
    df = df.sort_values(["step", "rule"], kind="stable").reset_index(drop=True)
    failed = df[df["outcome"] == "fail"]
    df.attrs["first_failed"] = {str(r): int(g["step"].min()) for r, g in failed.groupby("rule")}
    return df
