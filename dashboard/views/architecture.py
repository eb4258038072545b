"""The model's structure: its module tree with parameter counts, the weight matrices' shapes and dtype,
and the weight memory of each block in full precision and in every quantized variant of the audit."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, state
from microscope import results

store, refs, rec = state.current_audit()

st.header(f"Architecture · {rec.audit_id}")
arch = rec.architecture
if arch is None:
    state.notices(results.module_table(rec).attrs["missing"])
    st.stop()

c = st.columns(6)
c[0].metric("class", arch.class_name)
c[1].metric("family", arch.family)
c[2].metric("parameters", f"{arch.n_params:,}")
c[3].metric("blocks", arch.n_layers)
c[4].metric("hidden size", "—" if arch.hidden_size is None else arch.hidden_size)
c[5].metric("dtype", arch.dtype)
st.caption(
    " · ".join(
        part
        for part in (
            f"model type `{arch.model_type}`" if arch.model_type else "",
            f"{arch.n_heads} heads" if arch.n_heads else "",
            f"vocabulary {arch.vocab_size:,}" if arch.vocab_size else "",
            "causal" if arch.is_causal else "not causal",
            "has an unembedding" if arch.has_unembedding else "no unembedding",
        )
        if part
    )
)

# ---- module tree ------------------------------------------------------------------------------
st.subheader("Modules")
modules = state.module_table(store, rec)
if modules.empty:
    st.info("The architecture lists no modules.")
else:
    shown = modules.assign(
        module=[("\u2003" * d) + n.rsplit(".", 1)[-1] for n, d in zip(modules["name"], modules["depth"], strict=True)]
    )
    st.dataframe(
        shown[["module", "name", "type", "params", "share"]],
        hide_index=True,
        width="stretch",
        height=min(38 + 35 * len(shown), 420),
        column_config={
            "share": st.column_config.ProgressColumn("share", format="percent", min_value=0.0, max_value=1.0)
        },
    )

# ---- weight matrices --------------------------------------------------------------------------
table = state.layer_table(store, rec)
if "rows" in table.columns and not table["rows"].isna().all():
    st.subheader("Weight matrices")
    st.caption(f"{len(table)} matrices measured by the metrics stage, stored as {arch.dtype}")
    matrices = table[["name", "layer", "role", "rows", "cols"]].assign(
        params=(table["rows"] * table["cols"]).astype("int64"), dtype=arch.dtype
    )
    st.dataframe(matrices, hide_index=True, width="stretch", height=300)

# ---- memory by format -------------------------------------------------------------------------
st.subheader("Weight memory per block, by format")
memory = results.memory_table(rec, table)
state.notices(memory.attrs.get("missing", {}))
if not memory.empty:
    formats = [c.removeprefix("bytes[").removesuffix("]") for c in memory.columns if c.startswith("bytes[")]
    if len(formats) == 1:
        st.info(f"Only full precision: {results.HOW['quantize']}.")
    st.altair_chart(charts.memory_bars(memory, formats), width="stretch")
    mib = memory.assign(**{c: memory[c] / 2**20 for c in memory.columns if c.startswith("bytes[")})
    mib.columns = [c.replace("bytes[", "MiB[") for c in mib.columns]
    st.dataframe(mib, hide_index=True, width="stretch")
    measured = memory.attrs.get("measured") or {}
    if measured:
        st.caption(
            "Totals measured by the quantize stage (every tensor, biases and norms included): "
            + " · ".join(f"{v} {b / 2**20:.1f} MiB" for v, b in measured.items())
            + ". The table counts the 2-D weights only."
        )
