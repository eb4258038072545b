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
  columns: alpha, effective_rank, condition_number), `anomaly_reasons` (the record's flag texts).
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
    df.attrs["missing"] = missing
    df.attrs["undefined"] = undefined
    df.attrs["audit_id"] = record.audit_id
    return df


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
    (tokens its decoder direction raises/lowers). The contexts themselves: `feature_contexts`."""
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
    df = pd.DataFrame(out, columns=[c for c in FEATURE_COLUMNS if c in out])
    df.attrs["missing"] = {} if "top_logits" in out else {"sae.top_logits": "the model has no unembedding"}
    df.attrs["hook"] = hook
    return df


def feature_contexts(store: ArtifactStore, record: AuditRecord, hook: str, feature: int) -> list[dict[str, Any]]:
    """The feature's top-activating contexts, best first: `left`, `token`, `right` (text), `activation` (at
    the token), `window` and `position` (where in the ingested token windows). Empty when the audit has no
    such SAE. Per-token activations across a context are not stored by the sae stage, so none are given."""
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
