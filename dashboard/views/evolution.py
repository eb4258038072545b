"""A training run's audits ordered by step. One step slider drives every panel (the headline figures
against step with a rule at the step, a matrix's figure across steps, the aligned projection of the
layers, that step's layer table); ▶ plays the run. The panels live in one `st.fragment`, so a step
change (or a playback tick) reruns them alone, not the page."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, columns, state
from microscope import glossary

SPEEDS = (1, 2, 4, 8)  # steps per second
TRAIL = 3  # steps of each matrix's path behind it in the projection
FOLLOW_S = 5  # how often a followed run is looked at for new audits

store, refs = state.index_or_stop()
runs = sorted({r.run_id for r in refs if r.run_id})
st.header("Evolution")
if not runs:
    st.info(
        "No audit in this store belongs to a training run. Give each checkpoint's audit a run and a step: "
        "`microscope run --model CKPT --dataset FILE --run-id RUN --step N` (the training callbacks in "
        "`microscope.integrations` send both)."
    )
    st.stop()
current = state.selected_audit(refs)
run = state.choose("Run", runs, "run", default=current.run_id)
members = [r for r in refs if r.run_id == run]
members.sort(key=lambda r: (r.step if r.step is not None else -1, r.created_at))


def _run_state() -> tuple[tuple[str, str], ...]:
    """What the page was drawn from: the run's audits and their statuses, plus the ones still running."""
    listed = tuple((r.audit_id, r.status) for r in state.audit_index(store.uri) if r.run_id == run)
    return listed + tuple((str(m["audit_id"]), "running") for m in state.running(store.uri, run))


drawn = _run_state()
follow = st.toggle(
    "Follow the run live",
    value=True,
    help=f"Look for new checkpoints' audits every {FOLLOW_S} s and redraw when one finishes (no reload needed).",
)


@st.fragment(run_every=FOLLOW_S if follow else None)
def _watch() -> None:
    """Redraw the page when an audit of the run finishes or starts; say which are running meanwhile."""
    now = _run_state()
    if now != drawn:
        st.rerun(scope="app")
    steps_running = state.running(store.uri, run)
    if steps_running:
        st.info(
            "Running now: "
            + ", ".join(f"step {m['step']}" if m["step"] is not None else str(m["audit_id"]) for m in steps_running)
            + " (the page redraws when it finishes)"
        )


_watch()

series = state.run_series(store, run, members)
state.notices(series.attrs.get("missing", {}))
stepped = series[series["step"].notna()].copy()
if len(stepped) < len(series):
    st.info(f"{len(series) - len(stepped)} audit(s) of run `{run}` have no step and are left out: pass `--step N`.")
if stepped.empty:
    st.stop()
stepped["step"] = stepped["step"].astype(int)
stepped = stepped.drop_duplicates("step", keep="last")  # the latest audit of a step stands for it
steps = stepped["step"].tolist()
layers = state.run_layers(store, run, members)
key = state.run_key(store, members)

# ---- what the panels show (choices outside the fragment: changing them reruns the page) -------
figures = state.numeric_columns(stepped, exclude=("step",))
preferred = [c for c in figures if c in ("metrics.alpha_mean", "metrics.effective_rank_mean")]
preferred += [c for c in figures if c.startswith("sae[") and c.endswith(".fvu")][:1]
preferred += [c for c in figures if c.startswith("quantize[") and c.endswith(".kl_mean")][:1]
preferred += [c for c in figures if c.startswith("robustness") and c.endswith("_min")][:1]
preferred += [c for c in figures if c in ("reliability.ece", "reliability.mean_corruption_accuracy")]
preferred += [c for c in figures if c.startswith("reliability.auroc_")][:1]
landscape = [c for c in ("landscape.lambda_max", "landscape.eps_sharpness", "landscape.rho_sharpness") if c in figures]
preferred += landscape
chosen = st.multiselect(
    "Figures",
    figures,
    default=preferred or figures[:3],
    format_func=glossary.long_label,
    help="The audits' headline figures by their glossary label; the Overview's folded list gives each one's key.",
)
if landscape:
    st.caption(
        "`landscape.*` (λmax, ε- and ρ-sharpness) are diagnostics on one fixed data subset: comparable across this "
        "run's checkpoints, not across models; the Loss landscape page shows one checkpoint's slices."
    )
names = list(dict.fromkeys(layers["name"])) if "name" in layers.columns else []
per_matrix = state.numeric_columns(layers, exclude=("step", "layer", "rows", "cols")) if names else []
c1, c2, c3 = st.columns([3, 2, 1])
with c1:
    name = state.choose("Matrix", names, "layer") if names else None
with c2:
    column = (
        st.selectbox(
            "Its figure",
            per_matrix,
            index=per_matrix.index("alpha") if "alpha" in per_matrix else 0,
            format_func=glossary.label,
        )
        if per_matrix
        else None
    )
with c3:
    dims = st.radio("Projection", ("2-D", "3-D"), horizontal=True)
projection = state.run_projection(store, run, members)
matrix_series = None
if name is not None and column is not None:
    one = layers.loc[layers["name"] == name, ["step", column]].dropna(subset=["step"])
    matrix_series = pd.DataFrame({"step": one["step"].astype(int), column: one[column]})

# ---- playback ---------------------------------------------------------------------------------
PLAYING = "_microscope_playing"
p1, p2, _ = st.columns([2, 3, 4])  # ▶ Play keeps its label at 1000 px
playing = bool(st.session_state.get(PLAYING))
if p1.button("⏸ Pause" if playing else "▶ Play", disabled=len(steps) < 2):
    playing = not playing
    st.session_state[PLAYING] = playing
    if playing and state.param("step") == str(steps[-1]):
        state.set_param("step", steps[0])  # play from the start when at the end
speed = p2.select_slider("Steps per second", SPEEDS, value=4, key="_microscope_speed")


@st.fragment(run_every=1 / speed if playing else None)
def panels() -> None:
    if st.session_state.get(PLAYING):
        at_now = state.param("step")
        i = steps.index(int(at_now)) if at_now and at_now.lstrip("-").isdigit() and int(at_now) in steps else -1
        if i + 1 < len(steps):
            state.set_param("step", steps[i + 1])
        else:
            st.session_state[PLAYING] = False  # the last step: stop, and rerun the page so that the
            st.rerun()  # button says ▶ again and the fragment's timer ends
    default_step = current.step if current.run_id == run and current.step in steps else steps[-1]
    step = state.choose("Step", steps, "step", default=default_step, widget=st.select_slider)
    at = stepped[stepped["step"] == step].iloc[0]
    st.caption(f"Run `{run}`: {len(steps)} step(s) · step {step} is audit `{at['audit_id']}` ({at['status']})")

    cols = st.columns(3)
    for i, col in enumerate(chosen):
        cols[i % 3].vega_lite_chart(spec=charts.at_step(state.step_chart(key, col, stepped), step), width="stretch")
    left, right = st.columns(2)
    with left:
        if matrix_series is not None:
            spec = state.step_chart((*key, name), column, matrix_series)
            st.vega_lite_chart(spec=charts.at_step(spec, step), width="stretch")
            st.caption(f"{glossary.label(column)} of `{name}` across the run")
    with right:
        if projection.attrs.get("missing"):
            state.notices(projection.attrs["missing"])
        elif len(projection):
            explained = projection.attrs.get("explained", [])
            if dims == "3-D":
                st.plotly_chart(state.projection_3d(projection, step), width="stretch")
            else:
                lo = steps[max(0, steps.index(step) - TRAIL)]
                spec = charts.at_step(state.projection_chart(key, projection), step, lo)
                st.vega_lite_chart(spec=spec, width="stretch")
            st.caption(
                "Layers on the run's principal components (one basis for every step: motion is change); "
                f"variance explained {', '.join(f'{e:.0%}' for e in explained)}."
            )
    if st.session_state.get(PLAYING):  # the table would cost more than a tick: it returns on pause
        st.caption(f"The layer table at step {step} shows when playback pauses.")
        return
    with st.expander(f"Layer table at step {step}", expanded=True):
        rec = state.record_or_stop(store, str(at["audit_id"]))
        table = state.layer_table(store, rec)
        state.notices(table.attrs.get("missing", {}))
        columns.table(state.display(table), hide_index=True, width="stretch", height=320)


panels()

# ---- the gate across the run ------------------------------------------------------------------
history = state.gate_history(store, run, members)
if not history.empty:
    st.subheader("Gate across the run")
    first = history.attrs.get("first_failed", {})
    if first:
        st.error(
            " · ".join(
                f"**{rule}** first failed at step {step}" for rule, step in sorted(first.items(), key=lambda kv: kv[1])
            )
        )
    else:
        st.success(f"No rule failed at any of the {history['step'].nunique()} gated step(s).")
    st.altair_chart(charts.gate_strip(history), width="stretch")
with st.expander("The run's headline table"):
    st.dataframe(stepped, hide_index=True, width="stretch")
