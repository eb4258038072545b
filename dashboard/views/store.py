"""Store: the space each model and audit uses, what deleting one would free (or why it is refused), and the
deletion itself behind a confirmation; then "Delete unused": what no audit record references. Plans and
deletions are `microscope.store_admin`'s (the same as `microscope delete` / `microscope gc`)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import state
from microscope import store_admin
from microscope.errors import InputError
from microscope.store_admin import Plan, Usage, human_bytes

FLASH = "_microscope_store.flash"  # the last deletion's outcome, shown after the page re-reads the store

st.header("Store")
store = state.store()
if store is None:
    st.stop()


@st.cache_data(ttl=state.INDEX_TTL_S, show_spinner="Measuring the store…")
def _usage(uri: str) -> Usage:
    return store_admin.usage(store)


try:
    use = _usage(store.uri)
except state.READ_ERRORS as e:  # an unreadable record or an unreachable store: said, never raised
    st.error(f"Cannot measure the store `{store.uri}`: {e}")
    st.stop()

if msg := st.session_state.pop(FLASH, None):
    st.success(msg)

c1, c2, c3, c4 = st.columns(4)
c1.metric("Total", human_bytes(use.total_bytes))
c2.metric("Models", len(use.models))
c3.metric("Audits", len(use.audits))
c4.metric("Leftovers", human_bytes(use.leftover_bytes), help="temp files and unfinished uploads of killed writers")
st.caption(f"`{use.uri}` · {human_bytes(use.other_bytes)} in other files (markers, anything foreign)")

st.subheader("Models")
st.dataframe(
    pd.DataFrame(
        {
            "model": [m.model for m in use.models],
            "space": [human_bytes(m.bytes) for m in use.models],
            "unreferenced": [human_bytes(m.unreferenced_bytes) for m in use.models],
            "audits": [len(m.audits) for m in use.models],
            "bytes": [m.bytes for m in use.models],
        }
    ),
    hide_index=True,
    width="stretch",
)
st.subheader("Audits")
st.dataframe(
    pd.DataFrame(
        {
            "audit_id": [a.audit_id for a in use.audits],
            "model": [a.model for a in use.audits],
            "status": [a.status for a in use.audits],
            "own": [human_bytes(a.own_bytes) for a in use.audits],
            "shared": [human_bytes(a.shared_bytes) for a in use.audits],
            "shared with": [", ".join(a.shared_with) for a in use.audits],
            "own_bytes": [a.own_bytes for a in use.audits],
        }
    ).iloc[::-1],  # newest first
    hide_index=True,
    width="stretch",
)
st.caption(
    "own: the record, its patches and the artifacts no other audit uses (what deleting it frees); shared: "
    "artifacts other audits use too (counted once, in the model's space)."
)


def _show(plan: Plan) -> None:
    rows = [("record", k, n) for k, n in plan.records.items()]
    rows += [(store_admin.kind_of(k), k, n) for k, n in plan.units.items()]
    rows += [("leftover", k, n) for k, n in plan.leftovers.items()]
    if rows:
        df = pd.DataFrame(rows, columns=["kind", "item", "bytes"])
        df.insert(2, "space", df["bytes"].map(human_bytes))
        st.dataframe(df, hide_index=True, width="stretch")
    if plan.kept:
        st.caption("Kept (other audits use them): " + ", ".join(f"`{k}`" for k in sorted(plan.kept)))
    st.info(f"{plan.what}: frees **{human_bytes(plan.bytes)}** ({plan.bytes:,} bytes)")


def _delete(plan: Plan) -> None:
    freed = store_admin.execute(plan)
    if f"audits/{state.param('audit')}.json" in plan.records:
        state.set_param("audit", None)  # the selection named what is gone: the pages fall back to the latest
    st.session_state[FLASH] = f"{plan.what}: done, {human_bytes(freed)} freed."
    st.cache_data.clear()  # every page re-reads the store: the index, the records, the sizes
    st.rerun()


st.subheader("Delete an audit or a model")
kind = st.radio("What", ["audit", "model"], horizontal=True, key="_microscope_store.kind")
names = [a.audit_id for a in reversed(use.audits)] if kind == "audit" else [m.model for m in use.models]
if not names:
    st.info(f"No {kind} in this store." + (f" {state.PRODUCE}" if kind == "audit" else ""))
else:
    current = state.param("audit") if kind == "audit" else None  # the sidebar's audit, when it is here
    start = names.index(current) if current in names else 0
    target = st.selectbox(kind.capitalize(), names, index=start, key="_microscope_store.target")
    try:
        plan = (store_admin.plan_delete_audit if kind == "audit" else store_admin.plan_delete_model)(store, target)
    except InputError as e:
        st.error(f"Refused: {e}")
    else:
        _show(plan)
        typed = st.text_input(f"Type the {kind} id to confirm", key="_microscope_store.confirm")
        if st.button(
            f"Delete {kind} {target}", type="primary", disabled=typed.strip() != target, key="_microscope_store.delete"
        ):
            _delete(plan)

st.subheader("Delete unused")
st.caption("Artifact prefixes no audit record references, the patches of deleted audits and temp leftovers.")
try:
    gc = store_admin.plan_gc(store)
except InputError as e:
    st.error(f"Refused: {e}")
else:
    if gc.empty:
        st.success("Nothing unused: every artifact is referenced by an audit record.")
    else:
        _show(gc)
        sure = st.checkbox("Delete these unused artifacts", key="_microscope_store.gc_confirm")
        if st.button("Delete unused", disabled=not sure, key="_microscope_store.gc"):
            _delete(gc)
