"""The joined per-layer table (one row per weight matrix; see `microscope.results`): sortable, anomalous
rows highlighted, columns labelled from the glossary (what each is on hover), a few chosen by default and
all on demand, a link into the matrix explorer, a chart per chosen column, exports (CSV, Parquet, JSON) of
exactly the table."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import charts, exports, state
from dashboard.columns import column_config
from microscope import glossary

DEFAULT_COLUMNS = (
    "name",
    "role",
    "layer",
    "rows",
    "cols",
    "alpha",
    "spectral_norm",
    "stable_rank",
    "effective_rank_share",
    "condition_number",
    "anomaly",
    "anomaly_reasons",
)
MATRIX_PAGE = "views/matrix.py"  # another page (relative to app.py); offered only where app.py registers it

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

# Lists become text for display; the exports keep the table as it is. The frame handed to st.dataframe is
# the whole table: `column_order` picks what is shown, so sorting and the exports see the same rows.
shown = state.display(table)
everything = list(shown.columns)
defaults = [c for c in DEFAULT_COLUMNS if c in everything]
defaults += [c for c in everything if c not in defaults][: max(0, 6 - len(defaults))]  # blocks only: a few more
pick, show_all = st.columns([3, 1], vertical_alignment="bottom")  # the toggle keeps its label at 1000 px
every = show_all.toggle("All columns", key="_layers.all", help=f"Show all {len(everything)} columns")
chosen_cols = pick.multiselect(
    "Columns",
    everything,
    default=defaults,
    format_func=glossary.label,
    key="_layers.columns",
    disabled=every,
    help="The table's columns by their glossary label; hover a column header for what it is.",
)
order = everything if every else chosen_cols or defaults
config = column_config(shown)
if "anomaly" in shown.columns and shown.size <= 200_000:
    highlight = "background-color: rgba(214, 39, 40, 0.18)"
    styled = shown.style.apply(lambda row: [highlight if row["anomaly"] else ""] * len(row), axis=1)
    st.dataframe(styled, hide_index=True, width="stretch", height=420, column_config=config, column_order=order)
else:
    st.dataframe(shown, hide_index=True, width="stretch", height=420, column_config=config, column_order=order)


# ---- into the matrix explorer ----------------------------------------------------------------
def _registered(page: str) -> bool:
    """Whether app.py's st.navigation lists `page` (a file not yet registered cannot be switched to).
    Streamlit has no public API for the page list: its script context's, else no."""
    from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx

    path = (Path(__file__).resolve().parent / Path(page).name).resolve()
    try:
        pages = get_script_run_ctx().pages_manager.get_pages().values()  # type: ignore[union-attr]
        return path.is_file() and any(Path(p["script_path"]).resolve() == path for p in pages)
    except (AttributeError, KeyError, TypeError):
        return False


if _registered(MATRIX_PAGE):
    if (target := st.session_state.pop("_layers.open_target", None)) is not None:
        state.set_param("layer", target)
        st.switch_page(str(Path(__file__).resolve().parent / Path(MATRIX_PAGE).name))  # = MATRIX_PAGE, from anywhere

    def _open() -> None:  # remembered, then switched in the page body (a callback cannot switch pages)
        st.session_state["_layers.open_target"] = st.session_state.get("_layers.open")

    st.selectbox(
        "Open in the matrix explorer",
        list(table["name"]),
        index=None,
        placeholder="a matrix…",
        key="_layers.open",
        on_change=_open,
    )

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
chosen = st.multiselect("Chart columns", numeric, default=preferred or numeric[:1], format_func=glossary.label)
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
