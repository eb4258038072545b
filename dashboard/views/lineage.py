"""Lineage: what was made from the checkpoint, as a graph (stages, quantized variants and their records,
SAEs and their features tables, the report and the gate, coloured by status) and as a table with where each
lives in the store; then the steering patches exported from this audit into the store's `patches/` prefix."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from dashboard import state
from microscope.results.lineage import find_patches, lineage, lineage_dot

if TYPE_CHECKING:
    from schemas.records import AuditRecord

store, refs, rec = state.current_audit()

st.header(f"Lineage · {rec.audit_id}")
run = f"run `{rec.run_id}` step {rec.step} · " if rec.run_id else ""
st.caption(
    f"{run}status **{rec.status.value}** · model `{rec.model.source}` · "
    f"fingerprint `{rec.model.source_fingerprint[:16]}` · green: completed or cached, amber: partial, "
    "red: failed, grey: skipped"
)

lin = lineage(rec)
st.graphviz_chart(lineage_dot(lin), width="stretch")


def _location(href: str | None, kind: str) -> str | None:
    """A store key as its URI; URIs and local paths (the checkpoint, the report) as they are."""
    if not href or kind == "checkpoint" or "://" in href or href.startswith("/"):
        return href
    try:
        return store.uri_for(href)
    except state.READ_ERRORS:  # a key the store refuses: show it as recorded
        return href


def _page_link(page: str, **params: str) -> str:
    """A link to another page of the viewer, with the selection it needs (and the store when not the default)."""
    if (uri := state.param("store")) is not None:
        params = {"store": uri, **params}
    return f"./{page}?{urlencode(params)}"


rows = []
for n in lin["nodes"]:
    hook = n["id"].split(":", 1)[1] if n["kind"] in ("sae", "features") else None
    rows.append(
        {
            "node": n["label"].split("\n")[0],
            "kind": n["kind"],
            "status": n["status"],
            "location": _location(n["href"], n["kind"]),
            "page": _page_link("sae", audit=rec.audit_id, hook=hook) if n["kind"] == "features" else None,
            "id": n["id"],
        }
    )
st.subheader("Nodes")
st.dataframe(
    pd.DataFrame(rows),
    hide_index=True,
    width="stretch",
    column_config={"page": st.column_config.LinkColumn("page", display_text="SAE features")},
)
st.caption(f"{len(lin['nodes'])} nodes, {len(lin['edges'])} edges.")


@st.cache_data(ttl=state.INDEX_TTL_S, show_spinner="Looking for steering patches…")
def _patches(uri: str, audit_id: str, _rec: AuditRecord) -> list[dict]:
    del audit_id  # the cache key beside the store
    return find_patches(store, _rec)


st.subheader("Steering patches")
patches = _patches(store.uri, rec.audit_id, rec)
if not patches:
    st.info(
        f"No steering patch of this audit or its model's weights under `{store.uri_for('patches')}`. Patches "
        f"are not part of the audit record: export one with `microscope patch export {rec.audit_id} --hook HOOK "
        "--feature F=+A --out FOLDER` and copy the folder under the store's `patches/` prefix to list it here."
    )
else:
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "patch": _location(p["key"], "patch"),
                    "from audit": p["audit"],
                    "hook": p["hook"],
                    "variant": p["variant"],
                    "features": ", ".join(str(f) for f in p["features"]),
                    "made for": "this audit" if p["same_audit"] else "these weights (another audit)",
                    "SAE": _page_link("sae", audit=p["audit"], hook=p["hook"]) if p["audit"] and p["hook"] else None,
                }
                for p in patches
            ]
        ),
        hide_index=True,
        width="stretch",
        column_config={"SAE": st.column_config.LinkColumn("SAE", display_text="SAE features")},
    )
