"""The joined per-layer table (one row per weight matrix; see `microscope.results`): sortable, anomalous
rows highlighted, a chart per chosen column, exports (CSV, Parquet, JSON) of exactly the table."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, exports, state

store, refs, rec = state.current_audit()

st.header(f"Layers · {rec.audit_id}")
table = state.layer_table(store, rec)
state.notices(table.attrs.get("missing", {}))
if table.empty:
    st.info(
        "The layer table is empty: no stage of this audit measured a layer. Run the audit with "
        "`--stages ingest,trace,metrics` (or the full pipeline) to fill it."
    )
    st.stop()

if "anomaly" in table.columns:
    n = int(table["anomaly"].sum())
    st.caption(f"{len(table)} weight matrices · {n} flagged (highlighted)")
else:
    st.caption(f"{len(table)} blocks (no weight statistics: the metrics stage did not run)")

# Lists become text for display; the exports keep the table as it is.
shown = state.display(table)
if "anomaly" in shown.columns and shown.size <= 200_000:
    highlight = "background-color: rgba(214, 39, 40, 0.18)"
    styled = shown.style.apply(lambda row: [highlight if row["anomaly"] else ""] * len(row), axis=1)
    st.dataframe(styled, hide_index=True, width="stretch", height=420)
else:
    st.dataframe(shown, hide_index=True, width="stretch", height=420)

# ---- one matrix ------------------------------------------------------------------------------
names = list(table["name"])
name = state.choose("Matrix", names, "layer")
row = table[table["name"] == name].iloc[0]
reasons = row.get("anomaly_reasons")
if isinstance(reasons, list) and reasons:
    st.warning(f"`{name}` is flagged: " + "; ".join(reasons))
undefined = table.attrs.get("undefined", {}).get(name, {})
if undefined:
    with st.expander(f"Undefined figures of `{name}` ({len(undefined)})"):
        for col, why in undefined.items():
            st.markdown(f"- `{col}`: {why}")

# ---- charts per column ------------------------------------------------------------------------
numeric = state.numeric_columns(table, exclude=("layer", "rows", "cols"))
preferred = [c for c in ("spectral_norm", "alpha", "effective_rank") if c in numeric]
chosen = st.multiselect("Chart columns", numeric, default=preferred or numeric[:1])
if len(table) > charts.MAX_POINTS:
    st.caption(f"Charts show the first {charts.MAX_POINTS} of {len(table)} rows.")
for col in chosen:
    st.altair_chart(charts.column_bars(table, col), width="stretch")

# ---- exports ----------------------------------------------------------------------------------
st.subheader("Export")
cols = st.columns(len(exports.FORMATS))
for c, (fmt, (ext, mime)) in zip(cols, exports.FORMATS.items(), strict=True):
    c.download_button(
        f"{fmt}",
        exports.table_bytes(table, fmt),
        file_name=f"{rec.audit_id}-layers.{ext}",
        mime=mime,
        on_click="ignore",
        key=f"export-{ext}",
    )
