"""Two audits side by side (two checkpoints, or the same checkpoint under two configs): per-matrix deltas
of the layer table and charts on shared axes. The second audit is the `compare` query parameter."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, columns, state
from microscope import results

store, refs = state.index_or_stop()
st.header("Compare")
if len(refs) < 2:
    st.info(f"Comparing needs two audits; the store holds one. {state.PRODUCE}")
    st.stop()
a = state.selected_audit(refs)
others = [r for r in state.distinct(refs, keep=state.param("compare")) if r.audit_id != a.audit_id]
by_id = {r.audit_id: r for r in refs}
b_id = state.choose(
    "Compare with", [r.audit_id for r in reversed(others)], "compare", default=state.compare_default(a, others),
    format_func=lambda i: state.describe(by_id[i]),
    help="By default: the same run's previous checkpoint, else the same model under another config, else the "
    "latest audit of the same architecture.",
)  # fmt: skip
rec_a = state.record_or_stop(store, a.audit_id)
rec_b = state.record_or_stop(store, b_id)
st.caption(f"A = `{rec_a.audit_id}` (selected audit) · B = `{rec_b.audit_id}`")

heads = results.headline_compare(rec_a, rec_b)
if not heads.empty:
    with st.expander(
        "Summary figures (B − A): calibration, OOD, corruptions, robustness, fidelity, SAEs", expanded=True
    ):
        stages = sorted(set(heads["source"]))
        picked = st.multiselect(
            "Stages", stages, default=[s for s in stages if s.startswith("reliability")] or stages[:2]
        )
        columns.table(heads[heads["source"].isin(picked)], hide_index=True, width="stretch")

ta, tb = state.layer_table(store, rec_a), state.layer_table(store, rec_b)
for label, t in (("A", ta), ("B", tb)):
    for part, why in t.attrs.get("missing", {}).items():
        (st.warning if "failed" in why else st.info)(f"**{label} · {part}**: {why}")
common = [c for c in state.numeric_columns(ta, exclude=("layer", "rows", "cols")) if c in tb.columns]
if ta.empty or tb.empty or not common:
    st.info("The two audits share no per-layer figure: run both with the same stages to compare them.")
    st.stop()

joined = ta[["name", "layer", *common]].merge(tb[["name", *common]], on="name", how="outer", suffixes=(".A", ".B"))
only = joined[
    joined[[f"{c}.A" for c in common]].isna().all(axis=1) | joined[[f"{c}.B" for c in common]].isna().all(axis=1)
]
if not only.empty:
    st.info(f"{len(only)} matrices are in one audit only (different architectures?): their deltas are empty.")
deltas = pd.DataFrame({"name": joined["name"], "layer": joined["layer"]})
for c in common:
    deltas[f"Δ {c}"] = joined[f"{c}.B"] - joined[f"{c}.A"]
st.subheader("Per-matrix deltas (B − A)")
columns.table(deltas, hide_index=True, width="stretch", height=360)

preferred = [c for c in ("spectral_norm", "alpha") if c in common]
chosen = st.multiselect("Chart columns", common, default=preferred or common[:1])
for c in chosen:
    long = pd.concat(
        [
            pd.DataFrame({"name": joined["name"], "which": "A", "value": joined[f"{c}.A"]}),
            pd.DataFrame({"name": joined["name"], "which": "B", "value": joined[f"{c}.B"]}),
        ]
    )
    st.altair_chart(charts.paired_bars(long, c, ("A", "B")), width="stretch")
