"""Launch: start an audit from the browser. The form's "Estimate" reads only the checkpoint's safetensors
headers (`microscope.preflight`): parameters, weight memory per format, the activation cache's size, free disk
and memory, and the most faithful format that fits. "Start audit" submits through `flows.launch` (the audit
deployment when a Prefect server is configured, else `microscope run` on this machine) and follows the stages
live until the record is saved, then opens it."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import state

# The launch form is one of the viewer's two writers: it starts audits through the Prefect API, which lives in
# flows/ (docs/architecture.md); flows.launch imports Prefect only inside its functions.
from flows import launch  # noqa: TID251
from microscope import preflight
from microscope.errors import InputError
from microscope.quantization import FORMATS
from microscope.settings import get_settings
from schemas.config import HOOK_NAMES, STAGES

K = "_microscope_launch."  # session-state keys of this page
POLL_S = 2.0
PRUNING_EXAMPLES = ("magnitude-50", "magnitude-layer-50", "snip-30", "wanda-50")
VIA = {"deployment": "the audit deployment (Prefect)", "local": "this machine (`microscope run`)"}


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def _form() -> launch.LaunchForm:
    g = st.session_state.get
    return launch.LaunchForm(
        model=g(K + "model", ""),
        dataset=g(K + "dataset", ""),
        config=g(K + "config", ""),
        formats=tuple(g(K + "formats", [])),
        layers=g(K + "layers", "all"),
        hooks=tuple(g(K + "hooks", ["resid"])),
        stages=tuple(g(K + "stages", [])),
        run_id=g(K + "run_id", ""),
        step=g(K + "step", ""),
        tags=g(K + "tags", ""),
    )


def _show_estimate(pf: preflight.Preflight, fraction: float) -> None:
    c = st.columns(4)
    c[0].metric("parameters", "unknown" if pf.parameters.value is None else f"{pf.parameters.value:,}")
    c[1].metric("trace on disk", _size(pf.trace.value))
    c[2].metric("free disk (store)", _size(pf.free_disk.value))
    c[3].metric("free memory", _size(pf.free_memory.value))
    st.caption(f"Parameters: {pf.parameters.why}")
    rows = []
    for fmt, fig in pf.weights.items():
        fits = pf.fits(fmt, fraction)
        rows.append(
            {
                "format": fmt,
                "weights": _size(fig.value),
                "bytes": fig.value,
                "fits": "unknown" if fits is None else "yes" if fits else "no",
                "how": fig.why,
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(f"Trace: {pf.trace.why}")
    st.caption(f"Disk: {pf.free_disk.why}. Memory: {pf.free_memory.why}.")
    if pf.recommendation:
        (st.success if pf.recommended is None else st.info)(f"Recommendation: {pf.recommendation}")
    for w in pf.warnings:
        st.warning(w)


def _stage_table(p: launch.Progress) -> None:
    done = sum(v not in ("pending", "running") for v in p.stages.values())
    st.progress(done / max(len(p.stages), 1), text=f"{p.state}: {done}/{len(p.stages)} stage(s) settled")
    st.dataframe(
        pd.DataFrame([{"stage": s, "state": v} for s, v in p.stages.items()]), hide_index=True, width="stretch"
    )
    st.caption(p.message)


@st.fragment(run_every=POLL_S)
def _follow() -> None:
    """Polls the started audit; once it has finished, the whole page runs again to stop polling."""
    handle: launch.Handle = st.session_state[K + "handle"]
    try:
        p = launch.progress(handle)
    except Exception as e:  # noqa: BLE001 -- an unreachable server or store: say so, poll again
        st.warning(f"Cannot read the progress of audit {handle.audit_id} yet: {e}")
        return
    _stage_table(p)
    if p.finished:
        st.session_state[K + "done"] = p
        st.rerun(scope="app")


def _open_audit(audit_id: str, store: str) -> None:
    state.set_param("store", None if store == state.default_store_uri() else store)
    state.set_param("audit", audit_id)
    st.cache_data.clear()  # as the sidebar's Reload: the new record is not in the cached listing yet


# ---- the page ---------------------------------------------------------------------------------------

st.header("Launch an audit")
uri = state.store_uri()
if state._local_missing(uri):
    st.info(f"There is no store at `{uri}` yet: the first audit started here creates it. {state.PRODUCE}")
else:
    try:
        if not state.audit_index(uri):
            st.info(f"No audit in the store `{uri}` yet: start one below. {state.PRODUCE}")
    except state.READ_ERRORS as e:
        st.warning(f"Cannot list the audits in `{uri}`: {e}")

settings = get_settings()
st.text_input("Model", key=K + "model", placeholder="HF folder, .safetensors file, s3://… or hub id")
st.text_input("Dataset", key=K + "dataset", placeholder=".txt / .jsonl / .parquet / .npz file or HF dataset")
st.text_input("Base config (optional)", key=K + "config", placeholder="a YAML file or an example name (demo)")
c1, c2 = st.columns(2)
c1.multiselect(
    "Formats",
    [*FORMATS, *PRUNING_EXAMPLES],
    key=K + "formats",
    accept_new_options=True,
    help="Quantization formats (the registry) and pruning what-ifs; type others such as wanda-50+nf4.",
)
c2.multiselect("Stages", list(STAGES), key=K + "stages", placeholder="every stage")
c1.text_input("Layers", value="all", key=K + "layers", help="'all' or block indices: 0, 1, -1")
c2.multiselect("Hooks", list(HOOK_NAMES), default=["resid"], key=K + "hooks")
c1.text_input("Run id", key=K + "run_id")
c2.text_input("Step", key=K + "step")
st.text_area("Tags", key=K + "tags", placeholder="key=value, one per line")
if settings.prefect_api_url:
    st.radio("Run on", list(VIA), format_func=VIA.get, key=K + "via", horizontal=True)
else:
    st.caption(
        f"No Prefect server configured: the audit runs on this machine, its log under {settings.home_dir}/launch."
    )

b1, b2 = st.columns(2)
if b1.button("Estimate", key=K + "estimate_button"):
    try:
        cfg = launch.validate(_form())
        st.session_state[K + "estimate"] = (preflight.estimate(cfg.model.source or "", cfg, uri), cfg)
        st.session_state.pop(K + "error", None)
    except InputError as e:
        st.session_state[K + "error"] = str(e)
        st.session_state.pop(K + "estimate", None)
if b2.button("Start audit", key=K + "start_button", type="primary"):
    try:
        via = st.session_state.get(K + "via", "local") if settings.prefect_api_url else "local"
        st.session_state[K + "handle"] = launch.submit(_form(), store=uri, via=via, settings=settings)
        st.session_state.pop(K + "done", None)
        st.session_state.pop(K + "error", None)
    except InputError as e:
        st.session_state[K + "error"] = str(e)

if err := st.session_state.get(K + "error"):
    st.error(err)
if est := st.session_state.get(K + "estimate"):
    pf, cfg = est
    st.subheader("Pre-flight estimate")
    _show_estimate(pf, cfg.quantize.memory_fraction)

if (handle := st.session_state.get(K + "handle")) is not None:
    where = f"flow run `{handle.flow_run_id}`" if handle.kind == "deployment" else f"process {handle.pid}"
    st.subheader(f"Audit {handle.audit_id}")
    st.caption(f"Started as {where} · store `{handle.store}`" + (f" · log `{handle.log}`" if handle.log else ""))
    done: launch.Progress | None = st.session_state.get(K + "done")
    if done is None:
        _follow()
    else:
        _stage_table(done)
        if done.state in ("completed", "partial", "failed") and st.button("Open the audit", key=K + "open"):
            _open_audit(handle.audit_id, handle.store)
            st.switch_page("views/overview.py")
        elif done.state not in ("completed", "partial", "failed"):
            st.error(done.message)
