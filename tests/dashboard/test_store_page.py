"""The Store page (`dashboard/views/store.py`) through Streamlit's AppTest on a copy of the session's finished
audits: it shows each model's and audit's space (the figures `store_admin.usage` gives, checked against
os.walk sizes in tests/microscope/test_store_admin.py), refuses to delete a model its audits reference with
the reason, and deletes an audit behind its confirmation, after which the page re-reads the store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from microscope import store_admin
from microscope.store import open_store

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
VIEW = APP.parent / "views" / "store.py"
K = "_microscope_store."


def walk_total(root: Path) -> int:
    return sum(Path(d, n).stat().st_size for d, _, names in os.walk(root) for n in names)


@pytest.fixture
def copy(tmp_path: Path, home: Path, finished_audits: dict[str, dict]) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(finished_audits["step1"]["store_uri"], dst)
    return dst


def _page(uri: str) -> AppTest:
    """The page through app.py's navigation once it is registered there, else on its own."""
    if '"store.py"' in APP.read_text():
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.query_params["store"] = uri
        at.run()
        return at.switch_page("views/store.py").run()
    at = AppTest.from_file(str(VIEW), default_timeout=60)
    at.query_params["store"] = uri
    return at.run()


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_page_shows_sizes_and_refuses_a_referenced_model(copy: Path, finished_audits: dict[str, dict]) -> None:
    at = _page(str(copy))
    assert not at.exception, [e.value for e in at.exception]
    u = store_admin.usage(open_store(str(copy)))
    assert u.total_bytes == walk_total(copy)  # nothing temporary in a finished store
    assert at.metric[0].value == store_admin.human_bytes(u.total_bytes)
    models, table = at.dataframe[0].value, at.dataframe[1].value
    assert list(models["bytes"]) == [m.bytes for m in u.models]
    assert list(models["space"]) == [store_admin.human_bytes(m.bytes) for m in u.models]
    by_id = table.set_index("audit_id")
    assert set(by_id.index) == {r["audit_id"] for r in finished_audits.values()}
    for a in u.audits:
        assert by_id.loc[a.audit_id, "own_bytes"] == a.own_bytes
        assert by_id.loc[a.audit_id, "own"] == store_admin.human_bytes(a.own_bytes)

    at.radio(key=K + "kind").set_value("model").run()
    assert not at.exception
    refused = _texts(at.error)
    assert f"Refused: cannot delete model {u.models[0].model}: audit" in refused and "microscope delete" in refused
    assert not [b for b in at.button if b.key == K + "delete"]  # nothing to press
    assert walk_total(copy) == u.total_bytes


def test_page_deletes_an_audit_after_confirmation(copy: Path, finished_audits: dict[str, dict]) -> None:
    gone = finished_audits["partial"]["audit_id"]
    store = open_store(str(copy))
    want = store_admin.plan_delete_audit(store, gone).bytes
    before = walk_total(copy)

    at = _page(str(copy))
    at.selectbox(key=K + "target").select(gone).run()
    assert f"frees **{store_admin.human_bytes(want)}** ({want:,} bytes)" in _texts(at.info)
    delete = at.button(key=K + "delete")
    assert delete.disabled  # until the id is typed
    at.text_input(key=K + "confirm").input(gone).run()
    at.button(key=K + "delete").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not (copy / "audits" / f"{gone}.json").exists()
    assert before - walk_total(copy) == want
    assert f"delete audit {gone}: done, {store_admin.human_bytes(want)} freed." in _texts(at.success)
    assert gone not in set(at.dataframe[1].value["audit_id"])  # re-read after the deletion
