"""Loss landscape: how sharp the minimum is around the checkpoint's weights. The top Hessian eigenvalues and
which blocks their eigenvectors live in, the loss along one and two filter-normalised random directions, and
the sharpness figures, for full precision and each variant, on one fixed, recorded subset of the data."""

from __future__ import annotations

import altair as alt
import streamlit as st

from dashboard import charts, columns, state
from microscope.results.landscape import (
    MEANING,
    composition_frame,
    eigen_table,
    figures_table,
    landscape_overview,
    slice_1d_frame,
    slice_2d_frame,
    why_landscape_missing,
)

store, refs, rec = state.current_audit()

st.header(f"Loss landscape · {rec.audit_id}")
state.notices(why_landscape_missing(rec))
overview = landscape_overview(rec.stages.get("landscape"), rec.variants)
if overview is None:
    st.stop()
if overview["reason"]:
    st.info(f"The loss landscape is undefined for this model: {overview['reason']}")
    st.stop()
what = "predicted tokens" if overview["kind"] == "text" else "images"
st.caption(f"{overview['samples']} {what} (a fixed, seeded subset, the same for every variant) · {overview['note']}")
for fig, why in overview["undefined"].get("fp", {}).items():
    st.info(f"`{fig}` is undefined: {why}")
records = overview["records"]

# ---- the figures -------------------------------------------------------------------------------
st.subheader("Curvature and sharpness")
table = figures_table(records)
columns.table(table, hide_index=True, width="stretch")  # labels, help and formats from the glossary
sharp = overview["sharpness"]
fp = overview["figures"]["fp"]
cols = st.columns(3)
for col, name, label in zip(
    cols,
    ("lambda_max", "eps_sharpness", "rho_sharpness"),
    ("λmax", f"ε-sharpness (ε={sharp.get('eps')})", f"{'ASAM' if sharp.get('adaptive') else 'SAM'} ρ-sharpness (ρ={sharp.get('rho')})"),
    strict=True,
):  # fmt: skip
    col.metric(label, f"{fp[name]:.4g}" if name in fp else "—", help=MEANING[name])
    col.caption(MEANING[name])
st.caption(f"⚠ {sharp.get('label') or overview['note']}")

# ---- slices ------------------------------------------------------------------------------------
st.subheader("Loss along random directions")
st.caption(
    "Directions are Gaussian, rescaled filter by filter to the weights' norms (Li et al. 2018); biases and "
    "normalisation parameters stay put. α = 0 is the checkpoint."
)
left, right = st.columns(2)
line = slice_1d_frame(records)
if not line.empty:
    left.altair_chart(
        alt.Chart(line.head(charts.MAX_POINTS), title="1-D slice: L(θ + α·d)")
        .mark_line(point=True)
        .encode(
            x=alt.X("alpha:Q", title="α"),
            y=alt.Y("loss:Q", scale=alt.Scale(zero=False)),
            color=alt.Color("variant:N", title=None),
            tooltip=["variant", alt.Tooltip("alpha:Q", format=".3f"), alt.Tooltip("loss:Q", format=".5g")],
        )
        .properties(height=320),
        width="stretch",
    )
with_2d = [v for v, r in records.items() if r.details.get("slice_2d")]
if with_2d:
    with right:
        variant = st.selectbox("2-D slice of", with_2d, key="landscape_2d_variant")
        grid = slice_2d_frame(records[variant])
        heat = (
            alt.Chart(grid.head(charts.MAX_POINTS), title=f"2-D slice: L(θ + α·d1 + β·d2) · {variant}")
            .mark_rect()
            .encode(
                x=alt.X("alpha:O", title="α", axis=alt.Axis(format=".2f", labelOverlap=True)),
                y=alt.Y("beta:O", title="β", sort="descending", axis=alt.Axis(format=".2f", labelOverlap=True)),
                color=alt.Color("loss:Q", scale=alt.Scale(scheme="viridis", type="log")),
                tooltip=[
                    alt.Tooltip("alpha:Q", format=".3f"),
                    alt.Tooltip("beta:Q", format=".3f"),
                    alt.Tooltip("loss:Q", format=".5g"),
                ],
            )  # fmt: skip
            .properties(height=320)
        )
        st.altair_chart(heat, width="stretch")
else:
    right.info("No 2-D slice in this audit: set landscape.slice_2d: true (grid² loss evaluations).")

# ---- eigenvalues -------------------------------------------------------------------------------
eig = eigen_table(records["fp"])
if not eig.empty:
    st.subheader("Top Hessian eigenvalues")
    st.caption(
        "Power iteration on Hessian-vector products with deflation; an eigenvector's composition is its squared "
        "norm per block: where in the network the sharpest directions live."
    )
    columns.table(eig, hide_index=True, width="stretch")
    comp = composition_frame(records["fp"])
    if not comp.empty:
        top = comp[comp["rank"] == comp["rank"].min()].sort_values("share", ascending=False).head(charts.LABELLED)
        st.altair_chart(
            alt.Chart(top, title="composition of the top eigenvector per block")
            .mark_bar()
            .encode(
                x=alt.X("share:Q", axis=alt.Axis(format="%")),
                y=alt.Y("block:N", sort=None, title=None, axis=alt.Axis(labelLimit=260)),
                tooltip=["block", alt.Tooltip("share:Q", format=".2%")],
            )
            .properties(height=alt.Step(charts.ROW_PX + 6)),  # one band per block, however few
            width="stretch",
        )

with st.expander("Time per part (seconds)"):
    columns.table([overview["seconds"]], hide_index=True)
