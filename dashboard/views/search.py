"""Search: the layers or SAE features nearest to a chosen one, across every indexed audit (Qdrant: the
server when QDRANT_URL is set, else a snapshot of the local index, so the viewer never blocks an audit)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import state

store, refs, rec = state.current_audit()
by_id = {r.audit_id: r for r in refs}

st.header("Search")
if state.vector_index() is None:
    st.info(state.NOT_INDEXED)
    st.stop()
what = state.choose("Find", ["layers", "features"], "what", widget=st.radio, horizontal=True)
k = st.slider("Neighbours", 5, 50, 10)
others_only = st.toggle("Other audits only", value=False)


def _also(h: dict) -> str:
    """The other audits holding the same content (a re-run of the same weights): one hit, not one per audit."""
    return ", ".join(a for a in h.get("audit_ids") or [] if a != h["audit_id"])


def _where(audit_id: str) -> str:
    r = by_id.get(audit_id)
    if r is None:
        return "(not in this store)"
    return f"{r.run_id}@{r.step}" if r.run_id else r.model_source.rsplit("/", 1)[-1]


if what == "layers":
    table = state.layer_table(store, rec)
    if "spectral_norm" not in table.columns:
        state.notices(table.attrs.get("missing", {}))
        st.stop()
    name = state.choose("Like the matrix", list(table["name"]), "layer")
    hits = state.nearest("layers", (rec.audit_id, "fp", name.replace("/", "_")), k + 1)
    rows = [
        {
            "similarity": h["score"],
            "audit": h["audit_id"],
            "run@step / model": _where(h["audit_id"]),
            "also in": _also(h),
            "matrix": h["layer"],
            "block": h.get("block"),
            "alpha": h.get("alpha"),
            "flags": "; ".join(h.get("flags") or []),
        }
        for h in hits
        if not (h["audit_id"] == rec.audit_id and h["layer"] == name.replace("/", "_"))
    ]
    target, page = "matrix", "views/layers.py"
else:
    if not rec.saes:
        st.info("This audit trained no SAE: choose an audit with SAEs, or add trace,sae to --stages.")
        st.stop()
    hook = state.choose("SAE (hook)", sorted(rec.saes), "hook")
    d_sae = int(rec.saes[hook].details.get("d_sae") or 1)
    feature = state.choose_int("Like the feature", "feature", max_value=d_sae - 1)
    hits = state.nearest("features", (rec.audit_id, hook, feature), k + 1)
    rows = [
        {
            "similarity": h["score"],
            "audit": h["audit_id"],
            "run@step / model": _where(h["audit_id"]),
            "also in": _also(h),
            "hook": h["hook"],
            "feature": h["feature"],
            "density": h.get("density"),
            "top tokens": " ".join(h.get("top_tokens") or []),
        }
        for h in hits
        if not (h["audit_id"] == rec.audit_id and h["hook"] == hook and h["feature"] == feature)
    ]
    target, page = "feature", "views/sae.py"
if others_only:
    rows = [r for r in rows if r["audit"] != rec.audit_id]
if not rows:
    st.info(
        f"Nothing indexed near this {target}: the metrics stage indexes each audit's layers and SAE features "
        f"(run it for audit `{rec.audit_id}`)."
    )
    st.stop()
hits_df = pd.DataFrame(rows[:k])
st.dataframe(hits_df, hide_index=True, width="stretch")

# ---- open a hit -------------------------------------------------------------------------------
labels = [
    f"{r['audit']} · {r.get('matrix', r.get('hook'))}" + (f" #{r['feature']}" if "feature" in r else "")
    for r in rows[:k]
]
pick = st.selectbox("Open", range(len(labels)), format_func=lambda i: labels[i])
if st.button(f"Open this {target}"):
    hit = rows[pick]
    if hit["audit"] in by_id:
        state.set_param("audit", hit["audit"])
        if target == "matrix":
            state.set_param("layer", hit["matrix"])
        else:
            state.set_param("hook", hit["hook"])
            state.set_param("feature", hit["feature"])
        st.switch_page(page)
    else:
        st.warning(f"Audit `{hit['audit']}` is indexed but not in the store `{store.uri}`: switch the store first.")
