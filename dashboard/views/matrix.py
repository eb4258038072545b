"""Matrix explorer: one weight matrix of the audited checkpoint (the URL's `layer`, as the Layers table names
it): its weights pooled to a grid, their histogram, the empirical spectral density with the recorded
power-law fit and the Marchenko–Pastur bulk (WeightWatcher's plot), the Fisher diagonal, the quantization
error per variant and its history over the training run."""

from __future__ import annotations

import math
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard import state
from microscope.results import matrix as mx


@st.cache_data(max_entries=4, show_spinner="Reading the matrix…")
def _weight(uri: str, audit_id: str, digest: str, name: str, _rec: Any) -> tuple[str, np.ndarray]:
    del uri, audit_id, digest  # the cache key: one tensor of one audit's checkpoint
    return mx.read_matrix(_rec, name)


store, refs, rec = state.current_audit()
st.header(f"Matrix explorer · {rec.audit_id}")

cat = mx.matrix_catalog(rec)
if cat.empty:
    st.info(f"No weight matrix to explore: {mx.why_no_matrices(rec)}")
    st.stop()
names = list(cat["name"])

# A `layer` the audit lacks is said, with the nearest names; never replaced silently by another matrix.
wanted = state.param("layer")
if wanted and wanted not in names:
    near = mx.closest_names(wanted, names)
    st.error(
        f"No matrix `{wanted}` in audit {rec.audit_id} (the URL's `layer`). "
        + (f"Closest: {', '.join(f'`{n}`' for n in near)}." if near else "Pick one below.")
    )
    for n in near:
        if st.button(f"Open {n}", key=f"near-{n}"):
            state.set_param("layer", n)
            st.rerun()
    if st.button("Clear the selection", key="clear-layer"):
        state.set_param("layer", None)
        st.rerun()
    st.stop()

# ---- choose -------------------------------------------------------------------------------------
c1, c2 = st.columns([2, 3])
kinds = sorted(cat["kind"].unique())
chosen_kinds = c1.multiselect("Role", kinds, default=kinds, help="attention q/k/v/out, mlp, embedding, head…")
lo, hi = int(cat["params"].min()), int(cat["params"].max())
size = c2.slider("Parameters", lo, hi, (lo, hi)) if hi > lo else (lo, hi)
shown = cat[cat["kind"].isin(chosen_kinds) & cat["params"].between(*size)]
options = list(shown["name"])
if wanted and wanted not in options:  # the URL's matrix stays choosable whatever the filters say
    options.append(wanted)
if not options:
    st.info("No matrix passes these filters; widen the role or size filter.")
    st.stop()
name = state.choose("Matrix", options, "layer", format_func=lambda n: f"{n} · {mx.matrix_kind(n)}")
row = mx.matrix_row(rec, name)
rows, cols = row["shape"]
st.caption(
    f"`{name}` · {mx.matrix_kind(name)} · block {row['layer']} · {rows} × {cols} as measured "
    f"(conv kernels flattened to out × in·k·k; GPT-2's Conv1D as stored, in × out)"
)


def heatmap(df: pd.DataFrame, value: str, title: str, scheme: str, mid: float | None = None) -> alt.Chart:
    scale = alt.Scale(scheme=scheme, domainMid=mid) if mid is not None else alt.Scale(scheme=scheme)
    return (
        alt.Chart(df, title=title)
        .mark_rect()
        .encode(
            x=alt.X("col:O", title="column block", axis=alt.Axis(labels=False, ticks=False)),
            y=alt.Y("row:O", title="row block", axis=alt.Axis(labels=False, ticks=False)),
            color=alt.Color(f"{value}:Q", scale=scale, title=value),
            tooltip=["row", "col", alt.Tooltip(f"{value}:Q", format=".4g")],
        )
        .properties(height=360)
    )


def log_lines(layers: list[tuple[pd.DataFrame, str, str]], title: str) -> alt.LayerChart:
    """Log-log lines (density against λ), one per (frame, label, mark)."""
    parts: list[Any] = []
    for df, label, mark in layers:
        if df.empty:
            continue
        base = alt.Chart(df.assign(curve=label))
        enc = {
            "x": alt.X("lambda:Q", scale=alt.Scale(type="log"), title="λ (eigenvalue of WᵀW/N)"),
            "y": alt.Y("density:Q", scale=alt.Scale(type="log"), title="density"),
            "color": alt.Color("curve:N", title=None),
            "tooltip": [alt.Tooltip("lambda:Q", format=".4g"), alt.Tooltip("density:Q", format=".4g")],
        }
        parts.append((base.mark_point(filled=True) if mark == "point" else base.mark_line()).encode(**enc))
    return alt.layer(*parts).properties(title=title, height=360)


# ---- weights: read the one tensor lazily ------------------------------------------------------------
st.subheader("Weights")
w, stored = None, name
try:
    stored, w = _weight(store.uri, rec.audit_id, state.digest(store, rec), name, rec)
except mx.InputError as exc:
    st.info(f"The weights cannot be shown: {exc}")
if stored != name:
    st.caption(f"`{name}` is stored in the checkpoint as `{stored}` (tied weights).")
if w is not None:
    pool = st.radio(
        "Pooling",
        mx.POOLINGS,
        horizontal=True,
        format_func=lambda p: {"mean": "mean (signed)", "maxabs": "max |w|"}[p],
    )
    grid = mx.pooled_grid(w, mx.GRID_MAX_CELLS, pool)
    p1, p2 = st.columns(2)
    title = f"{pool} over blocks of ≈{math.ceil(rows / grid.shape[0])}×{math.ceil(cols / grid.shape[1])} weights"
    frame = mx.grid_frame(grid, "weight")
    p1.altair_chart(
        heatmap(frame, "weight", title, "redblue" if pool == "mean" else "viridis", 0.0 if pool == "mean" else None),
        width="stretch",
    )
    hist = mx.weight_histogram(w)
    p2.altair_chart(
        alt.Chart(hist, title="weight values")
        .mark_bar()
        .encode(
            x=alt.X("lo:Q", bin="binned", title="weight"),
            x2="hi:Q",
            y=alt.Y("count:Q", scale=alt.Scale(type="symlog"), title="count (symlog)"),
            tooltip=[alt.Tooltip("lo:Q", format=".4g"), alt.Tooltip("hi:Q", format=".4g"), "count"],
        )
        .properties(height=360),
        width="stretch",
    )
    st.caption(
        f"Grid {grid.shape[0]} × {grid.shape[1]} (at most {mx.GRID_MAX_CELLS}²), near-equal blocks · "
        f"mean {w.mean():.4g} · std {w.std():.4g} · min {w.min():.4g} · max {w.max():.4g}"
    )

# ---- spectrum: ESD, power law, MP bulk --------------------------------------------------------------
st.subheader("Empirical spectral density")
try:
    sv = mx.saved_singular_values(store, rec, name)
except mx.InputError as exc:
    st.info(f"No spectrum: {exc}")
else:
    sp = mx.matrix_spectrum(sv, row)
    lo_edge, hi_edge = sp["edges"]
    chart = log_lines(
        [(sp["esd"], "ESD", "point"), (sp["power_law"], "power-law fit", "line"), (sp["mp"], "MP bulk", "line")],
        f"ESD of {name}",
    )
    rules = pd.DataFrame(
        [{"lambda": hi_edge, "what": "λ+ (MP edge)"}]
        + ([{"lambda": lo_edge, "what": "λ− (MP edge)"}] if lo_edge > 0 else [])
        + ([{"lambda": sp["xmin"], "what": "xmin (fit)"}] if sp["xmin"] else [])
    )
    marks = (
        alt.Chart(rules)
        .mark_rule(strokeDash=[4, 3])
        .encode(
            x="lambda:Q", color=alt.Color("what:N", title=None), tooltip=["what", alt.Tooltip("lambda:Q", format=".4g")]
        )
    )
    st.altair_chart(alt.layer(chart, marks), width="stretch")
    alpha = sp["alpha"]
    fit = (
        f"α = {alpha:.3f} (recorded), xmin = {sp['xmin']:.4g}, {int(row.get('n_tail') or 0)} of {sp['n']} eigenvalues "
        "in the tail"
        if isinstance(alpha, float | int) and sp["xmin"]
        else "no power-law fit was recorded (see the Layers page's undefined figures for why)"
    )
    st.caption(
        f"λ = σ²/N with N = {sp['N']} (eigenvalues of WᵀW/N; the recorded xmin is in σ² units, divided by N here, α "
        f"does not change) · {fit} · MP bulk [{lo_edge:.4g}, {hi_edge:.4g}] for variance σ² = {sp['var']:.4g} "
        f"(‖W‖²_F / (N·M)) · {len(sp['spikes'])} spike(s) above λ+ (recorded mp_spikes: {row.get('mp_spikes')})"
    )
    if row.get("spectrum") == "randomized":
        st.warning(
            f"Only the top {row.get('n_singular_values')} singular values were computed (randomized path): "
            "the ESD shows those alone."
        )
    if len(sp["spikes"]):
        with st.expander(f"Spikes above the MP edge ({len(sp['spikes'])})"):
            st.dataframe(
                pd.DataFrame({"rank": np.arange(1, len(sp["spikes"]) + 1), "lambda": sp["spikes"]}),
                hide_index=True,
            )

# ---- Fisher diagonal --------------------------------------------------------------------------------
st.subheader("Fisher diagonal")
try:
    fgrid = mx.fisher_grid(store, rec, name, stored)
except mx.InputError as exc:
    st.info(str(exc))
else:
    st.altair_chart(
        heatmap(mx.grid_frame(fgrid, "log10_fisher"), "log10_fisher", "log10 mean Fisher per block", "inferno"),
        width="stretch",
    )
    st.caption(f"Empirical Fisher diagonal mean-pooled to {fgrid.shape[0]} × {fgrid.shape[1]} blocks, log10.")

# ---- quantization error per variant ------------------------------------------------------------------
st.subheader("Quantization error")
if not rec.variants:
    st.info("This audit has no quantized variant: add quantize to --stages and list quantize.formats.")
elif w is None:
    st.info("The quantization error needs the full-precision weights, which cannot be read (see above).")
else:
    qe = mx.matrix_quant_errors(store, rec, name, w, stored)
    if qe.empty:
        st.info("No quantized variant of this audit finished.")
    else:
        st.caption(
            "‖W_q − W‖_F / ‖W‖_F, read from each variant's saved weights (dequantized where stored as int8 or 4-bit)."
        )
        st.dataframe(qe, hide_index=True, width="stretch")

# ---- history over the run ------------------------------------------------------------------------------
st.subheader("History over the training run")
if not rec.run_id:
    st.info("This audit belongs to no training run: audit checkpoints with --run-id RUN --step N to follow a matrix.")
else:
    run_refs = [r for r in refs if r.run_id == rec.run_id]
    hist_df = mx.matrix_history(state.run_layers(store, rec.run_id, run_refs), name)
    hist_df = hist_df[hist_df["step"].notna()] if "step" in hist_df.columns else hist_df
    if hist_df.empty:
        st.info(
            f"No audit of run {rec.run_id} with a step recorded `{name}`: audit its checkpoints with "
            "--run-id RUN --step N."
        )
    else:
        figs = [c for c in mx.MATRIX_HISTORY_COLUMNS if c in hist_df.columns and hist_df[c].notna().any()]
        h_cols = st.columns(min(3, max(1, len(figs))))
        for i, fig in enumerate(figs[:6]):
            h_cols[i % len(h_cols)].altair_chart(
                alt.Chart(hist_df[["step", fig]].dropna(), title=fig)
                .mark_line(point=True)
                .encode(x=alt.X("step:Q"), y=alt.Y(f"{fig}:Q", scale=alt.Scale(zero=False)), tooltip=["step", fig])
                .properties(height=200),
                width="stretch",
            )
        st.dataframe(hist_df, hide_index=True, width="stretch")
