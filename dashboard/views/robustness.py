"""Robustness: accuracy against ε per attack and variant, the AutoAttack table (each variant against full
precision) and the SAE features that move most under attack."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, columns, state
from microscope import results

store, refs, rec = state.current_audit()

st.header(f"Robustness · {rec.audit_id}")
curves = results.robustness_curves(rec)
state.notices(curves.attrs.get("missing", {}))
if curves.empty:
    st.stop()
r = rec.stages["robustness"]
st.caption(
    f"surface `{r.details.get('surface', '?')}` · {int(r.metrics.get('samples', 0))} samples · "
    f"clean accuracy {r.metrics.get('clean_accuracy', float('nan')):.3f} · label: {r.details.get('label', '—')}"
)
for fig, why in r.undefined.items():
    st.info(f"`{fig}` is undefined: {why}")

# ---- accuracy against ε ------------------------------------------------------------------------
st.subheader("Accuracy against ε")
attacks = [a for a in results.SWEEP_ATTACKS if a in set(curves["attack"])]
cols = st.columns(max(len(attacks), 1))
for c, attack in zip(cols, attacks, strict=False):
    c.altair_chart(charts.eps_curves(curves, attack), width="stretch")
with st.expander("The curves as a table"):
    columns.table(
        curves.pivot_table(index=["variant", "eps"], columns="attack", values="accuracy").reset_index(),
        hide_index=True,
        width="stretch",
    )

# ---- AutoAttack --------------------------------------------------------------------------------
st.subheader("AutoAttack")
aa = results.autoattack_table(rec)
if aa.empty:
    st.info("No AutoAttack result: robustness.norms and robustness.eps choose its runs.")
else:
    columns.table(
        aa,
        hide_index=True,
        width="stretch",
        column_config={"delta_vs_fp": st.column_config.NumberColumn("Δ vs fp", format="%+.3f")},
    )
    for flag in sorted({f for fl in aa["flags"] for f in fl.split("; ") if f}):
        st.warning(f"AutoAttack flagged: {flag}")

# ---- brittle SAE features ---------------------------------------------------------------------
st.subheader("Brittle SAE features")
brittle = results.brittle_features(rec)
state.notices(brittle.attrs.get("missing", {}))
if not brittle.empty:
    st.caption("The features whose activation moves most between clean and attacked inputs (full precision).")
    columns.table(brittle, hide_index=True, width="stretch")

# ---- per layer -------------------------------------------------------------------------------
shifts = [(h, v) for h, v in (r.details.get("layer_shifts") or {}).items()]
if shifts:
    import pandas as pd

    st.subheader("Representation shift per layer under attack")
    df = pd.DataFrame(shifts, columns=["hook", "shift"]).sort_values("shift", ascending=False)
    columns.table(df, hide_index=True, width="stretch")
