"""One audit at a glance: the gate's verdict and the anomalies, then 6–8 headline figures chosen for the
model's modality (a classifier, a causal LM, a text encoder), each formatted for people with its glossary
help on hover; then, folded, every headline figure by its record key, the stages with their durations and
where to look further (the HTML report, the MLflow run, the Prefect flow run)."""

from __future__ import annotations

import math
import os
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import state
from dashboard.columns import column_config, help_text
from microscope import audits, glossary, results
from microscope.formatting import fmt, share
from schemas.hooks import hook_parts

TILES = 8
# (source, figure) per modality, in the order shown; `[*]` repeats per variant or per SAE hook.
FIGURES: dict[str, tuple[tuple[str, str], ...]] = {
    glossary.CLASSIFIER: (
        ("reliability", "accuracy"),
        ("robustness", "autoattack_*"),
        ("reliability", "ece"),
        ("reliability", "mean_corruption_accuracy"),
        ("ingest", "n_params"),
        ("memory", ""),
        ("quantize[*]", "accuracy_q"),
        ("metrics", "flagged"),
    ),
    glossary.CAUSAL_LM: (
        ("quantize[*]", "ppl_fp"),
        ("quantize[*]", "kl_mean"),
        ("sae[*]", "fvu"),
        ("sae[*]", "ce_recovered"),
        ("metrics", "alpha_mean"),
        ("ingest", "n_params"),
        ("memory", ""),
        ("metrics", "flagged"),
    ),
    glossary.ENCODER: (
        ("ingest", "n_params"),
        ("ingest", "n_layers"),
        ("quantize[*]", "min_cosine"),
        ("sae[*]", "fvu"),
        ("metrics", "alpha_mean"),
        ("memory", ""),
        ("metrics", "flagged"),
        ("robustness", "clean_accuracy"),
    ),
}
ONCE = {"ppl_fp"}  # the same figure in every variant's record (full precision's): shown once


def modality(head: dict[str, dict[str, float]], rec: Any) -> str:
    arch = rec.architecture
    return glossary.modality(
        "n_images" in head.get("ingest", {}),
        bool(arch and arch.is_causal),
        bool(arch and arch.has_unembedding),
    )


def _where(source: str) -> str:
    """`quantize[int8]` → int8; `sae[blocks.1.hook_resid_post]` → resid 1."""
    qual = source.partition("[")[2].rstrip("]")
    if source.startswith("sae["):
        layer, hook = hook_parts(qual)
        return f"{hook} {layer}"
    return qual


def _tile(source: str, key: str, value: float) -> dict[str, Any] | None:
    term = glossary.lookup(f"{source.partition('[')[0]}.{key}")  # the variant or hook goes after "·"
    if term is None or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    where = _where(source) if "[" in source and key not in ONCE else ""
    name = f"SAE {term.label}" if source.startswith("sae[") else term.label
    return {
        "label": f"{name} · {where}" if where else name,
        "value": fmt(value, term.kind),
        "help": help_text(term),
    }


def memory_tile(rec: Any) -> dict[str, Any] | None:
    """The smallest variant's weight memory against full precision's, both measured in bytes by the
    quantize stage (every tensor the model holds), and the share computed from those two numbers."""
    q = results.quantization_table(rec)
    if q.empty or "measured_bytes" not in q.columns or "fp_bytes" not in q.columns:
        return None
    q = q.dropna(subset=["measured_bytes", "fp_bytes"])
    if q.empty:
        return None
    row = q.loc[q["measured_bytes"].idxmin()]
    ratio = row["measured_bytes"] / row["fp_bytes"]
    note = (
        " Close to full precision's: the format leaves most tensors as they were (a pruned variant keeps its "
        "zeros in dense storage; torch-int8 replaces Linear layers only, so convolutions, embeddings, norms "
        "and biases keep their dtype)."
        if ratio > 0.9
        else ""
    )
    return {
        "label": f"memory · {row['variant']}",
        "value": fmt(row["measured_bytes"], "bytes"),
        "delta": f"{share(row['measured_bytes'], row['fp_bytes'])} of fp ({fmt(row['fp_bytes'], 'bytes')})",
        "help": (
            "Bytes of every tensor the smallest variant holds (quantized weights, scales, the tensors left at "
            "full precision) against the full-precision model measured the same way (`measured_bytes`, "
            f"`fp_bytes` of quantize[{row['variant']}])." + note
        ),
    }


def key_figures(head: dict[str, dict[str, float]], rec: Any, kind: str) -> list[dict[str, Any]]:
    """The tiles of `kind`: figures the record has, in FIGURES' order, at most TILES."""
    tiles: list[dict[str, Any]] = []
    for source, key in FIGURES[kind]:
        if source == "memory":
            found = [t] if (t := memory_tile(rec)) else []
        elif source.endswith("[*]"):
            stem = source[:-3]
            found = [
                _tile(s, key, figs[key]) for s, figs in sorted(head.items()) if s.startswith(f"{stem}[") and key in figs
            ][: 1 if key in ONCE else 2]
        elif key.endswith("_*"):
            figs = head.get(source, {})
            found = [_tile(source, k, v) for k, v in sorted(figs.items()) if k.startswith(key[:-1])][:1]
        else:
            figs = head.get(source, {})
            found = [_tile(source, key, figs[key])] if key in figs else []
        tiles += [t for t in found if t is not None]
    return tiles[:TILES]


store, refs, rec = state.current_audit()
head = audits.headline(rec)
kind = modality(head, rec)

st.header(f"Audit {rec.audit_id}")
run = f"run `{rec.run_id}` step {rec.step} · " if rec.run_id else ""
what = {glossary.CLASSIFIER: "classifier", glossary.CAUSAL_LM: "causal LM", glossary.ENCODER: "text encoder"}[kind]
st.caption(
    f"{run}status **{rec.status.value}** · {what} `{rec.model.source}` · digest `{(rec.model_digest or '—')[:16]}` · "
    f"created {rec.created_at:%Y-%m-%d %H:%M:%S}"
    + (f" · finished {rec.finished_at:%H:%M:%S}" if rec.finished_at else "")
)
if rec.status.value == "failed":
    st.error(
        f"This audit failed: {rec.error or 'no error recorded'}. Each failed stage below names its error; "
        f"fix it and run the audit again (stages that finished are cached and not recomputed)."
    )

# ---- the gate's verdict -----------------------------------------------------------------------
verdict = results.gate_verdict(rec)
if verdict is not None:
    say = {"fail": st.error, "warn": st.warning, "pass": st.success}[verdict.verdict]
    say(f"**Gate {verdict.verdict.upper()}** · {verdict.summary()}")
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "rule": r.rule,
                    "outcome": r.outcome,
                    "value": r.value,
                    "baseline": r.baseline_value,
                    "compared": r.compared,
                    "check": f"{r.metric} {r.check} ({r.aggregate})",
                    "offenders / note": ", ".join(o.key for o in r.offenders[:5]) or (r.reason or ""),
                }
                for r in verdict.results
            ]
        ),
        hide_index=True,
        width="stretch",
    )
elif (g := rec.stages.get("gate")) is not None and g.status.value == "failed":
    st.warning(f"**gate** failed: {g.error}")
else:
    st.caption(
        f"No gate verdict: judge this audit with `microscope gate {rec.audit_id} --rules gates` (add `--save` to "
        "keep it), or set `gate: {rules: gates}` in the audit config."
    )

# ---- anomalies --------------------------------------------------------------------------------
table = state.layer_table(store, rec)
st.subheader("Anomalies")
if "anomaly" in table.columns:
    flagged = table[table["anomaly"]]
    if flagged.empty:
        st.success(f"No anomaly flagged among {len(table)} weight matrices.")
    else:
        st.error(f"{len(flagged)} of {len(table)} weight matrices flagged (details on the Layers page).")
        shown = flagged[["name", "layer", "role", "anomaly_reasons"]].assign(
            anomaly_reasons=flagged["anomaly_reasons"].map("; ".join)
        )
        st.dataframe(shown, hide_index=True, width="stretch", column_config=column_config(shown))
else:
    st.info(f"No anomaly flags: the metrics stage produced none. {results.HOW['metrics'].capitalize()}.")
state.notices(table.attrs.get("missing", {}))

# ---- key figures ------------------------------------------------------------------------------
st.subheader("Key figures")
tiles = key_figures(head, rec, kind)
if not tiles:
    st.info("No stage recorded summary figures yet.")
for start in range(0, len(tiles), 4):
    cols = st.columns(4)
    for col, t in zip(cols, tiles[start : start + 4], strict=False):
        col.metric(t["label"], t["value"], t.get("delta"), delta_color="off", help=t["help"])

# ---- everything else, folded ------------------------------------------------------------------
with st.expander("All headline figures (record keys, full precision: what gate rules name)"):
    if not head:
        st.info("No stage recorded summary figures yet.")
    for source, figures in head.items():
        shown_figs = {
            k: v for k, v in figures.items() if (t := glossary.lookup(f"{source}.{k}")) is None or t.applies_to(kind)
        }
        if not shown_figs:
            continue
        st.markdown(f"**{source}**")
        cols = st.columns(6)
        for i, (name, value) in enumerate(shown_figs.items()):
            text = f"{value:.6g}" if isinstance(value, int | float) and math.isfinite(value) else str(value)
            term = glossary.lookup(f"{source}.{name}")
            cols[i % 6].metric(name, text, help=f"**{term.label}**: {help_text(term)}" if term else None)

rows = []
for name, r in (
    [*rec.stages.items()]
    + [(f"{s}[{v}]", r) for v, recs in sorted(rec.variants.items()) for s, r in sorted(recs.items())]
    + [(f"sae[{h}]", r) for h, r in sorted(rec.saes.items())]
):
    rows.append(
        {
            "stage": name,
            "status": r.status.value,
            "time": fmt(r.seconds, "seconds"),
            "seconds": r.seconds,
            "started_at": r.started_at,
            "finished_at": r.finished_at,
            "error": r.error,
            "mlflow_run_id": r.mlflow_run_id,
        }
    )
stages = pd.DataFrame(rows)
failed = int((stages["status"] == "failed").sum()) if not stages.empty else 0
with st.expander(f"Stages ({len(stages)}{f', {failed} failed' if failed else ''})", expanded=bool(failed)):
    if stages.empty:
        st.info("No stage has run in this audit.")
    else:
        order = {"failed": 0, "partial": 1, "skipped": 2}
        stages = stages.sort_values("status", key=lambda s: s.map(lambda v: order.get(v, 3)), kind="stable")
        st.dataframe(
            stages,
            hide_index=True,
            width="stretch",
            column_config={"seconds": st.column_config.NumberColumn("seconds", format="%.3g")},
        )

# ---- where to look further --------------------------------------------------------------------
with st.expander("Links: the HTML report, MLflow, Prefect", expanded=True):
    c1, c2, c3 = st.columns(3)
    with c1:
        st.markdown("**HTML report**")
        if rec.report_uri:
            st.code(rec.report_uri, language=None)
            if "://" not in rec.report_uri and os.path.isfile(rec.report_uri):
                with open(rec.report_uri, "rb") as f:
                    st.download_button(
                        "Download the report", f.read(), file_name=f"{rec.audit_id}.html", mime="text/html"
                    )
        else:
            st.info(f"No report: {results.HOW['report']}.")
    with c2:
        st.markdown("**MLflow run**")
        if rec.mlflow_run_id:
            st.code(rec.mlflow_run_id, language=None)
            uri = rec.mlflow_tracking_uri or ""
            if uri.startswith("http"):
                st.link_button("Open in MLflow", f"{uri.rstrip('/')}/#/runs/{rec.mlflow_run_id}")
            elif uri:
                st.caption(f"tracking URI `{uri}` (`mlflow ui --backend-store-uri {uri}` to browse it)")
        else:
            st.info("No MLflow run recorded for this audit.")
    with c3:
        st.markdown("**Prefect flow run**")
        if rec.prefect_flow_run_id:
            st.code(rec.prefect_flow_run_id, language=None)
            ui = state.prefect_ui_url()
            if ui.startswith("http"):
                st.link_button("Open in Prefect", f"{ui.rstrip('/')}/runs/flow-run/{rec.prefect_flow_run_id}")
        else:
            st.info("No Prefect flow run recorded for this audit.")
