"""Reliability: are the model's probabilities honest (calibration, before and after temperature scaling), does
it know an input is unlike its data (OOD detection per score), and how it degrades under common corruptions,
for full precision and each quantized variant on the same samples."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, columns, state
from microscope import results

store, refs, rec = state.current_audit()

st.header(f"Reliability · {rec.audit_id}")
table = results.reliability_table(rec)
state.notices(table.attrs.get("missing", {}))
if table.empty:
    st.stop()
fp = rec.stages["reliability"]
overview = results.reliability_overview(fp, rec.variants) or {}
st.caption(
    f"{int(fp.metrics.get('samples', 0))} samples (the same for every variant) · "
    + (overview.get("binning") or "no calibration")
    + " · binned ECE is biased upwards at small n"
)
for fig, why in fp.undefined.items():
    st.info(f"`{fig}` is undefined: {why}")

# ---- calibration -------------------------------------------------------------------------------
st.subheader("Calibration")
columns.table(table, hide_index=True, width="stretch")  # labels, help and formats from the glossary
bins = results.reliability_diagram(rec)
if not bins.empty:
    views = list(dict.fromkeys(bins["view"]))
    cols = st.columns(len(views))
    for col, view in zip(cols, views, strict=True):
        col.altair_chart(charts.reliability_diagram(bins[bins["view"] == view], view), width="stretch")

# ---- OOD detection -----------------------------------------------------------------------------
st.subheader("Out-of-distribution detection")
ood = results.ood_table(rec)
if not ood.empty:
    st.caption(
        "AUROC and AUPR-in take in-distribution as positive; FPR95 (ID positive, as in the energy paper) is the "
        "share of OOD inputs accepted when 95% of in-distribution ones are kept; FPR95 (OOD positive, OpenOOD "
        "v1.5) the share of in-distribution inputs flagged when 95% of OOD ones are caught."
    )
    columns.table(ood, hide_index=True, width="stretch")
    variant = st.selectbox("ROC curves of", list(table["variant"]), key="reliability_roc_variant")
    roc = results.roc_points(rec, variant)
    sets = list(dict.fromkeys(roc["ood_set"])) if not roc.empty else []
    for col, ood_set in zip(st.columns(max(len(sets), 1)), sets, strict=False):
        col.altair_chart(charts.roc_curves(roc, ood_set), width="stretch")

# ---- randomized smoothing ----------------------------------------------------------------------
smoothing = results.smoothing_table(rec)
if not smoothing.empty:
    st.subheader("Randomized-smoothing certificates")
    st.caption(
        "Cohen et al.'s CERTIFY: the share of images classified correctly with a certified L2 radius ≥ r "
        f"({overview.get('bound') or 'Clopper-Pearson'}); abstentions count as wrong."
    )
    columns.table(smoothing, hide_index=True, width="stretch")

# ---- corruptions -------------------------------------------------------------------------------
corr = results.corruption_table(rec)
if not corr.empty:
    st.subheader("Common corruptions")
    variants = list(dict.fromkeys(corr["variant"]))
    for col, v in zip(st.columns(len(variants)), variants, strict=True):
        col.altair_chart(charts.corruption_heatmap(corr, v), width="stretch")
