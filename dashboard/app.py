"""Microscope's viewer of finished audits: `streamlit run dashboard/app.py` (or `python -m dashboard
[--store URI]`). The sidebar chooses the store and the audit; `st.navigation` runs the page."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run` puts dashboard/ on the path, not the repository root
    sys.path.insert(0, str(ROOT))

from dashboard import prewarm, state  # noqa: E402
from microscope.settings import get_settings  # noqa: E402

VIEWS = Path(__file__).resolve().parent / "views"  # not pages/: Streamlit runs such a folder as v1 pages

st.set_page_config(page_title="Microscope", page_icon="🔬", layout="wide")
state.restore_params()


def _store_changed() -> None:
    uri = st.session_state["_microscope_store_input"].strip()
    state.set_param("store", None if uri in ("", state.default_store_uri()) else uri)
    state.set_param("audit", None)  # the old store's audit means nothing in the new one
    state.set_param("compare", None)
    state.set_param("run", None)


def _run() -> None:
    with st.sidebar:
        st.title("🔬 Microscope")
        st.session_state["_microscope_store_input"] = state.store_uri()
        st.text_input(
            "Store",
            key="_microscope_store_input",
            on_change=_store_changed,
            help="A folder or s3://bucket/prefix (default: the settings' store, from MICROSCOPE_HOME or MICROSCOPE_STORE).",
        )
        if st.button("Reload", help="Read the store again (new audits, finished stages)."):
            st.cache_data.clear()
        uri = state.store_uri()
        refs = []
        try:  # whatever the store does, the page list below must stay: the page says what is wrong
            if not state._local_missing(uri) and state.store_refused(uri) is None:
                refs = state.audit_index(uri)
            if refs:
                state.audit_picker(refs, widget=st.selectbox, key="_microscope_pick.sidebar_audit")
                st.caption(f"{len(refs)} audit(s) in the store")
        except state.READ_ERRORS as e:
            st.caption(f"Cannot list the audits: {str(e).splitlines()[0][:200]}")

    pages = [
        st.Page(str(VIEWS / "audits.py"), title="Audits", icon="🗂️", default=True),
        st.Page(str(VIEWS / "overview.py"), title="Overview", icon="📋"),
        st.Page(str(VIEWS / "architecture.py"), title="Architecture", icon="🏗️"),
        st.Page(str(VIEWS / "layers.py"), title="Layers", icon="🧱"),
        st.Page(str(VIEWS / "matrix.py"), title="Matrix explorer", icon="🔬"),
        st.Page(str(VIEWS / "cka.py"), title="CKA", icon="🔗"),
        st.Page(str(VIEWS / "sae.py"), title="SAE features", icon="🧬"),
        st.Page(str(VIEWS / "lab.py"), title="Feature lab", icon="🎛️"),
        st.Page(str(VIEWS / "quantization.py"), title="Quantization", icon="🗜️"),
        st.Page(str(VIEWS / "robustness.py"), title="Robustness", icon="🛡️"),
        st.Page(str(VIEWS / "reliability.py"), title="Reliability", icon="🎯"),
        st.Page(str(VIEWS / "landscape.py"), title="Landscape", icon="⛰️"),
        st.Page(str(VIEWS / "attribution.py"), title="Attribution", icon="🔍"),
        st.Page(str(VIEWS / "lineage.py"), title="Lineage", icon="🧭"),
        st.Page(str(VIEWS / "compare.py"), title="Compare", icon="⚖️"),
        st.Page(str(VIEWS / "evolution.py"), title="Evolution", icon="📈"),
        st.Page(str(VIEWS / "search.py"), title="Search", icon="🔎"),
        st.Page(str(VIEWS / "launch.py"), title="Launch", icon="🚀"),
        st.Page(str(VIEWS / "store.py"), title="Store", icon="🗄️"),
    ]
    st.navigation(pages).run()


try:
    with prewarm.WARM_UP.page_run():  # never while the warm-up imports (see dashboard/prewarm.py)
        _run()
finally:  # after the first page has rendered (also when it stopped or asked for a rerun); once per process
    if get_settings().viewer_prewarm:
        prewarm.WARM_UP.start()
