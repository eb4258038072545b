"""Quantized variants against full precision: fidelity per format (KL, top-1 agreement, Δ perplexity, or
accuracy for a classifier), memory, and activation drift per traced layer."""

from __future__ import annotations

import math

import streamlit as st

from dashboard import charts, columns, state
from microscope import results

store, refs, rec = state.current_audit()

st.header(f"Quantization · {rec.audit_id}")
table = results.quantization_table(rec)
state.notices(table.attrs.get("missing", {}))
if table.empty:
    st.stop()

for _, row in table.iterrows():
    if row["status"] == "failed":
        st.warning(f"**{row['variant']}** failed: {row['error']}")
    elif row.get("fell_back"):
        st.info(
            f"**{row['variant']}** fell back from {row['requested']} to {row['produced']} (see the stage's attempts)."
        )

# ---- fidelity and memory per format -----------------------------------------------------------
st.subheader("Fidelity and memory per format")
fidelity = [c for c in results.QUANT_FIGURES if c in table.columns]
cols = st.columns(max(len(table), 1))
for c, (_, row) in zip(cols, table.iterrows(), strict=False):
    c.markdown(f"**{row['variant']}** · {row['produced'] or '—'}")
    for fig in fidelity[:3]:
        v = row.get(fig)
        c.metric(fig, "undefined" if v is None or not math.isfinite(v) else f"{v:.4g}")
    if isinstance(row.get("memory_ratio"), float) and math.isfinite(row["memory_ratio"]):
        c.metric("memory vs fp", f"{row['memory_ratio']:.1%}", help=f"{row['measured_bytes'] / 2**20:.1f} MiB measured")
undefined = table.attrs.get("undefined", {})
if undefined:
    with st.expander(f"Undefined figures ({sum(len(u) for u in undefined.values())})"):
        for v, figs in undefined.items():
            for fig, why in figs.items():
                st.markdown(f"- **{v}** · `{fig}`: {why}")
columns.table(table, hide_index=True, width="stretch")

# ---- drift per layer --------------------------------------------------------------------------
st.subheader("Activation drift per layer")
drift = results.drift_table(rec)
if drift.empty:
    st.info("No per-layer drift: it needs traced points (add trace to --stages; trace.layers chooses them).")
else:
    c1, c2 = st.columns(2)
    c1.altair_chart(charts.by_layer(drift, "cosine", "cosine to full precision"), width="stretch")
    c2.altair_chart(charts.by_layer(drift, "rel_error", "‖q − fp‖ / ‖fp‖"), width="stretch")
    worst = drift.sort_values("rel_error", ascending=False).iloc[0]
    st.caption(f"Largest drift: {worst['variant']} at `{worst['hook']}` (relative error {worst['rel_error']:.4g}).")
    columns.table(drift, hide_index=True, width="stretch")

# ---- per matrix: memory -----------------------------------------------------------------------
memory = results.memory_table(rec, state.layer_table(store, rec))
if not memory.empty:
    st.subheader("Weight memory per block")
    formats = [c.removeprefix("bytes[").removesuffix("]") for c in memory.columns if c.startswith("bytes[")]
    st.altair_chart(charts.memory_bars(memory, formats), width="stretch")

# ---- pruned variants: sparsity against fidelity, and where the zeros fell ---------------------
pruned = results.pruning_table(rec)
if not pruned.empty:
    st.subheader("Pruned variants (no fine-tuning)")
    st.caption(
        "Pruning what-ifs: the weights zeroed as the method ranks them, without the fine-tuning that pruning "
        "usually gets; `sparsity` is the exact share of zeros in the pruned matrices (embeddings and the output "
        "head of a language model are never pruned)."
    )
    figure = next((f for f in results.CURVE_FIGURES if f in pruned.columns and pruned[f].notna().any()), None)
    if figure is not None and pruned.groupby("method").size().max() > 1:
        st.altair_chart(charts.sparsity_curve(pruned, figure), width="stretch")
    columns.table(pruned, hide_index=True, width="stretch")
    c1, c2 = st.columns(2)
    variant = c1.selectbox("Mask of variant", list(pruned["variant"]), key="mask_variant")
    mats = results.pruned_matrices(rec, variant)
    matrix = c2.selectbox("Matrix", list(mats), format_func=lambda m: f"{m} ({mats[m]:.1%} pruned)", key="mask_matrix")
    try:
        grid = results.mask_grid(store, rec, variant, matrix)
    except results.InputError as exc:
        st.info(str(exc))
    else:
        st.altair_chart(charts.mask_heatmap(grid, f"{matrix} in {variant}: share kept per block"), width="stretch")
