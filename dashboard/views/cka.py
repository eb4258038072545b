"""CKA: linear CKA (Kornblith et al. 2019) between the traced layers of the audited model, and per traced
point between full precision and each variant, as the metrics stage recorded it."""

from __future__ import annotations

import altair as alt
import streamlit as st

from dashboard import state
from microscope.results import matrix as mx

store, refs, rec = state.current_audit()
st.header(f"CKA · {rec.audit_id}")

why = mx.why_no_cka(rec)
if why is not None:
    st.info(f"No CKA in this audit: {why}")
    st.stop()

layers = mx.cka_layers(rec)
order = list(dict.fromkeys(layers["a"]))
st.subheader("Between traced layers")
st.altair_chart(
    alt.Chart(layers, title="linear CKA (same tokens through every point)")
    .mark_rect()
    .encode(
        x=alt.X("b:N", sort=order, title=None, axis=alt.Axis(labelLimit=220)),
        y=alt.Y("a:N", sort=order, title=None, axis=alt.Axis(labelLimit=220)),
        color=alt.Color("cka:Q", scale=alt.Scale(domain=[0, 1], scheme="viridis"), title="CKA"),
        tooltip=["a", "b", alt.Tooltip("cka:Q", format=".4f")],
    )
    .properties(height=max(240, 26 * len(order))),
    width="stretch",
)
st.caption(f"{len(order)} traced points · CKA 1 on the diagonal; near 1 off it: the two points represent alike.")
with st.expander("Values"):
    st.dataframe(layers.pivot(index="a", columns="b", values="cka").loc[order, order], width="stretch")

st.subheader("Full precision against each variant")
variants = mx.cka_variants(rec)
if variants.empty:
    st.info(
        "No variant was traced: run quantize and trace before metrics (quantize.formats lists the variants; "
        "quantize.trace_variants: true, the default, traces them) to compare them with full precision."
    )
else:
    hooks = list(dict.fromkeys(h for h in order if h in set(variants["hook"]))) or sorted(set(variants["hook"]))
    st.altair_chart(
        alt.Chart(variants, title="linear CKA, fp vs variant, per traced point")
        .mark_rect()
        .encode(
            x=alt.X("variant:N", title=None),
            y=alt.Y("hook:N", sort=hooks, title=None, axis=alt.Axis(labelLimit=220)),
            color=alt.Color("cka:Q", scale=alt.Scale(scheme="viridis"), title="CKA"),
            tooltip=["variant", "hook", alt.Tooltip("cka:Q", format=".6f")],
        )
        .properties(height=max(200, 26 * len(hooks))),
        width="stretch",
    )
    st.dataframe(variants, hide_index=True, width="stretch")
