"""Every audit in the store, filterable by model, run, status and date; choosing one selects it for every
page (the `audit` query parameter)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import state

st.header("Audits")
store, refs = state.index_or_stop()

table = pd.DataFrame(
    {
        "audit_id": [r.audit_id for r in refs],
        "created_at": [r.created_at for r in refs],
        "status": [r.status for r in refs],
        "run_id": [r.run_id for r in refs],
        "step": pd.array([r.step for r in refs], dtype="Int64"),
        "model": [r.model_source for r in refs],
        "digest": [(r.digest or "")[:12] for r in refs],
    }
).iloc[::-1]  # newest first

c1, c2, c3, c4 = st.columns([3, 2, 2, 3])
model = c1.text_input("Model", placeholder="part of the source, or a digest prefix")
runs = sorted({r.run_id for r in refs if r.run_id})
run = c2.selectbox("Run", ["(any)", *runs])
statuses = c3.multiselect("Status", sorted(set(table["status"])))
days = sorted({r.created_at.date() for r in refs})
period = c4.date_input("Created between", value=(days[0], days[-1]), min_value=days[0], max_value=days[-1])

shown = table
if model:
    shown = shown[shown["model"].str.contains(model, regex=False) | shown["digest"].str.startswith(model)]
if run != "(any)":
    shown = shown[shown["run_id"] == run]
if statuses:
    shown = shown[shown["status"].isin(statuses)]
if isinstance(period, tuple) and len(period) == 2:
    dates = shown["created_at"].map(lambda t: t.date())
    shown = shown[(dates >= period[0]) & (dates <= period[1])]

st.dataframe(shown, hide_index=True, width="stretch")
st.caption(f"{len(shown)} of {len(refs)} audits")

if shown.empty:
    st.info("No audit matches these filters.")
    st.stop()
state.selected_audit(refs)  # a link naming no audit of this store: said here, and the page stops
visible = [r for r in refs if r.audit_id in set(shown["audit_id"])]
chosen = state.audit_picker(visible, widget=st.selectbox, key="_microscope_pick.audits_page")
if chosen is None:
    st.info("The selected audit is not among the filtered ones: widen the filters to pick it.")
    st.stop()
st.success(
    f"Selected `{chosen.audit_id}` ({chosen.status}). Open **Overview**, **Layers** or **Evolution** in the "
    "navigation: the selection is in the URL."
)
if chosen.status == "failed":
    st.warning(f"Audit `{chosen.audit_id}` failed: Overview says where and how to run it again.")
