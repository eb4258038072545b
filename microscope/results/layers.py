"""The joined per-layer table.

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

import math
from typing import TYPE_CHECKING, Any

from schemas.hooks import hook_parts, matrix_role
from schemas.records import AuditRecord, StageStatus

from microscope.results.missing import HOW, number, variant_why_missing, why_missing
from microscope.store import ArtifactStore

if TYPE_CHECKING:
    import pandas as pd

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


def _per_block(record: AuditRecord, missing: dict[str, str]) -> dict[int, dict[str, Any]]:
    """Figures measured per traced (layer, hook), keyed by block: {layer: {column: value}}."""
    blocks: dict[int, dict[str, Any]] = {}

    def put(hook_name: str, column: str, value: Any) -> None:
        layer, hook = hook_parts(hook_name)
        blocks.setdefault(layer, {})[f"{column}.{hook}"] = value

    trace = record.stages.get("trace")
    if (why := why_missing(record, "trace")) is not None:
        missing["trace"] = why
    elif trace is not None:
        for hook_name, d in (trace.details.get("datasets") or {}).items():
            for stat, column in TRACE_FIGURES.items():
                if stat in (d.get("stats") or {}):
                    put(hook_name, column, number(d["stats"][stat]))

    if (why := why_missing(record, "quantize")) is not None:
        missing["quantize"] = why
    elif not record.variants:
        missing["quantize"] = f"quantize made no variant: {HOW['quantize']}"
    missing |= variant_why_missing(record, "quantize")
    for v, recs in sorted(record.variants.items()):
        q = recs.get("quantize")
        for hook_name, drift in ((q.details.get("drift") or {}) if q else {}).items():
            put(hook_name, f"quant_cosine[{v}]", number(drift.get("cosine")))
            put(hook_name, f"quant_rel_error[{v}]", number(drift.get("rel_error")))

    if (why := why_missing(record, "sae")) is not None:
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
                    put(hook_name, f"sae_{fig}[{v}]", number(vm[fig]))

    metrics = record.stages.get("metrics")
    cka = (metrics.details.get("cka") or {}) if metrics and why_missing(record, "metrics") is None else {}
    if metrics is not None and why_missing(record, "metrics") is None and not cka.get("layers"):
        missing["metrics.cka"] = "CKA needs traced activations: add trace to --stages before metrics"
    names = cka.get("layers") or []
    matrix = cka.get("matrix") or []
    by_hook: dict[str, list[tuple[int, int]]] = {}  # hook kind -> [(layer, index in the matrix)] by layer
    for i, hook_name in enumerate(names):
        layer, hook = hook_parts(hook_name)
        by_hook.setdefault(hook, []).append((layer, i))
    for hook, points in by_hook.items():
        points.sort()
        for j, (layer, i) in enumerate(points):
            row = blocks.setdefault(layer, {})
            if j > 0:
                row[f"cka_prev.{hook}"] = number(matrix[i][points[j - 1][1]])
            if j + 1 < len(points):
                row[f"cka_next.{hook}"] = number(matrix[i][points[j + 1][1]])
    for v, per_hook in sorted((cka.get("variants") or {}).items()):
        for hook_name, value in per_hook.items():
            put(hook_name, f"cka[{v}]", number(value))

    rob = record.stages.get("robustness")
    if (why := why_missing(record, "robustness")) is not None:
        missing["robustness"] = why
    elif rob is not None and not rob.details.get("layer_shifts"):
        missing["robustness"] = "robustness recorded no per-layer shift (it needs traced activations and a sweep)"
    missing |= variant_why_missing(record, "robustness")
    sources = [("", rob)] + [(f"[{v}]", recs.get("robustness")) for v, recs in sorted(record.variants.items())]
    for suffix, r in sources:
        for hook_name, value in ((r.details.get("layer_shifts") or {}) if r else {}).items():
            put(hook_name, f"attack_shift{suffix}", number(value))
    return blocks


def _matrix_rows(record: AuditRecord, missing: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per weight matrix from the metrics record (its `weights` and `sensitivity` details)."""
    undefined: dict[str, Any] = {}
    metrics = record.stages.get("metrics")
    if (why := why_missing(record, "metrics")) is not None or metrics is None or not metrics.details.get("weights"):
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
            "role": matrix_role(w["name"]),
            "rows": shape[0],
            "cols": math.prod(shape[1:]) if len(shape) > 1 else None,
        }
        for col in WEIGHT_COLUMNS:
            if col in w:
                row[col] = w[col] if col == "spectrum" else number(w[col])
        flags = list(w.get("flags") or [])
        row["anomaly"] = bool(flags)
        row["anomalies"] = sorted({c for f in flags for c in FLAGGED_COLUMNS if f.startswith(c.replace("_", " "))})
        row["anomaly_reasons"] = flags
        if w.get("undefined"):
            undefined[w["name"]] = dict(w["undefined"])
        if sens:
            s = sens.get(w["name"], {})
            for col in SENSITIVITY_COLUMNS:
                row[col] = number(s.get(col))
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
    if (why := why_missing(record, "ingest")) is not None:
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
        layer, hook = hook_parts(hook_name)
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
