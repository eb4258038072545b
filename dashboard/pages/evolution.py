"""A training run's audits ordered by step: one step slider drives every panel (the headline figures
against step with a rule at the step, a matrix's figure across steps, that step's layer table)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, state

store, refs = state.index_or_stop()
runs = sorted({r.run_id for r in refs if r.run_id})
st.header("Evolution")
if not runs:
    st.info(
        "No audit in this store belongs to a training run. Give each checkpoint's audit a run and a step: "
        "`microscope run --model CKPT --dataset FILE --run-id RUN --step N` (the training callbacks in "
        "`microscope.integrations` send both)."
    )
    st.stop()
current = state.selected_audit(refs)
run = state.choose("Run", runs, "run", default=current.run_id)
members = [r for r in refs if r.run_id == run]
members.sort(key=lambda r: (r.step if r.step is not None else -1, r.created_at))

series = state.run_series(store, run, members)
state.notices(series.attrs.get("missing", {}))
stepped = series[series["step"].notna()].copy()
if len(stepped) < len(series):
    st.info(f"{len(series) - len(stepped)} audit(s) of run `{run}` have no step and are left out: pass `--step N`.")
if stepped.empty:
    st.stop()
stepped["step"] = stepped["step"].astype(int)
stepped = stepped.drop_duplicates("step", keep="last")  # the latest audit of a step stands for it
steps = stepped["step"].tolist()

default_step = current.step if current.run_id == run and current.step in steps else steps[-1]
step = state.choose("Step", steps, "step", default=default_step, widget=st.select_slider)
at = stepped[stepped["step"] == step].iloc[0]
st.caption(f"Run `{run}`: {len(steps)} step(s) · step {step} is audit `{at['audit_id']}` ({at['status']})")

# ---- headline figures against step ------------------------------------------------------------
figures = state.numeric_columns(stepped, exclude=("step",))
preferred = [c for c in figures if c in ("metrics.alpha_mean", "metrics.effective_rank_mean")]
preferred += [c for c in figures if c.startswith("sae[") and c.endswith(".fvu")][:1]
preferred += [c for c in figures if c.startswith("quantize[") and c.endswith(".kl_mean")][:1]
chosen = st.multiselect("Figures", figures, default=preferred or figures[:3])
cols = st.columns(3)
for i, col in enumerate(chosen):
    cols[i % 3].altair_chart(charts.step_lines(stepped, col, step), width="stretch")
with st.expander("The run's headline table"):
    st.dataframe(stepped, hide_index=True, width="stretch")

# ---- one matrix across steps ------------------------------------------------------------------
layers = state.run_layers(store, run, members)
if "name" in layers.columns and not layers.empty:
    st.subheader("One matrix across steps")
    names = list(dict.fromkeys(layers["name"]))
    c1, c2 = st.columns(2)
    with c1:
        name = state.choose("Matrix", names, "layer")
    per_matrix = state.numeric_columns(layers, exclude=("step", "layer", "rows", "cols"))
    if per_matrix:
        with c2:
            column = st.selectbox("Figure", per_matrix, index=per_matrix.index("alpha") if "alpha" in per_matrix else 0)
        one = layers.loc[layers["name"] == name, ["step", column]].dropna(subset=["step"])
        one = pd.DataFrame({"step": one["step"].astype(int), column: one[column]})
        st.altair_chart(charts.step_lines(one, column, step), width="stretch")

# ---- that step's layer table ------------------------------------------------------------------
st.subheader(f"Layer table at step {step}")
rec = state.record_or_stop(store, str(at["audit_id"]))
table = state.layer_table(store, rec)
state.notices(table.attrs.get("missing", {}))
shown = table.copy()
for col in ("anomalies", "anomaly_reasons"):
    if col in shown.columns:
        shown[col] = shown[col].map(lambda v: "; ".join(v) if isinstance(v, list) else v)
st.dataframe(shown, hide_index=True, width="stretch", height=360)
