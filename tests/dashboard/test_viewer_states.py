"""What the viewer says when the URL or the store is wrong, and how it names audits: a link naming an
unknown audit or matrix is an explicit message offering the closest (never another audit's figures), a
store that cannot be read is one line with the page list intact, an unreadable record is left out and
named, a deployment's viewer opens only its own store; pickers name audits by model, run and step with
repeated audits collapsed, and Compare starts from the same run's previous checkpoint. AppTest on the
session's real finished audits (copied where a test changes them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import make_bucket

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def _page(store: str, page: str, **params: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["store"] = store
    at.query_params.update(params)
    at.run()
    if page != "audits":
        at.switch_page(f"views/{page}.py").run()
    return at


def _said(at: AppTest) -> str:
    return "\n".join(str(e.value) for e in [*at.error, *at.warning, *at.info])


@pytest.fixture(scope="module")
def recs(finished_audits: dict[str, dict]) -> dict[str, dict]:
    return finished_audits


def test_an_unknown_audit_in_a_link_is_said_with_the_closest_never_another_audit(recs: dict) -> None:
    real = recs["step1"]["audit_id"]
    typo = real[:-2] + ("zz" if not real.endswith("zz") else "yy")
    at = _page(recs["step1"]["store_uri"], "overview", audit=typo)
    assert not at.exception, [e.value for e in at.exception]
    (err,) = at.error
    assert f"`{typo}`" in err.value and "not in this store" in err.value
    assert any(real[-6:] in b.label for b in at.button), [b.label for b in at.button]  # the closest, to open
    assert not [h for h in at.header if h.value.startswith("Audit ")]  # no audit's page drawn under it
    assert at.query_params["audit"] == typo  # the link is left as it was, not rewritten to another audit
    opened = next(b for b in at.button if real[-6:] in b.label).click().run()
    assert opened.query_params["audit"] == real and "not in this store" not in _said(opened)


def test_an_unknown_matrix_in_a_link_is_said_with_the_closest(recs: dict) -> None:
    at = _page(
        recs["step1"]["store_uri"], "layers", audit=recs["step1"]["audit_id"], layer="transformer.h.0.attn.c_atn.weight"
    )
    assert not at.exception, [e.value for e in at.exception]
    said = _said(at)
    assert "`transformer.h.0.attn.c_atn.weight`" in said and "Closest: `transformer.h.0.attn.c_attn.weight`" in said


def test_a_feature_past_the_saes_width_is_said(recs: dict) -> None:
    at = _page(recs["step1"]["store_uri"], "sae", audit=recs["step1"]["audit_id"], feature="99999")
    assert not at.exception, [e.value for e in at.exception]
    assert "No feature `99999` here (features 0 to" in _said(at)


def test_an_unreadable_record_is_left_out_and_named(recs: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(recs["step1"]["store_uri"], store)
    (store / "audits" / "20260101-000000-broken.json").write_text('{"audit_id": "20260101-000000-broken", "sta')
    at = _page(str(store), "overview")
    assert not at.exception, [e.value for e in at.exception]
    said = _said(at)
    assert "cannot be read and are left out" in said and "20260101-000000-broken.json" in said
    assert [h for h in at.header if h.value.startswith("Audit ")]  # the other audits still open


def test_a_store_that_cannot_be_read_is_one_line_and_the_pages_stay(s3_env: str) -> None:
    make_bucket(s3_env, "viewer-states")
    for uri, says in (("s3://no-such-bucket/audits", "does not exist"), ("s3://viewer-states/empty", "No audit")):
        for page in ("overview", "layers", "evolution"):
            at = _page(uri, page)
            assert not at.exception, [e.value for e in at.exception]
            assert says in _said(at), _said(at)
            at.switch_page("views/audits.py").run()  # the page list is still there to move on
            assert not at.exception


def test_a_deployments_viewer_opens_only_its_own_store(recs: dict, tmp_path: Path, monkeypatch) -> None:
    own = recs["step1"]["store_uri"]
    monkeypatch.setenv("MICROSCOPE_VIEWER_STORES", own)
    at = _page(str(tmp_path), "overview")
    assert not at.exception
    assert "reads only" in _said(at) and f"`{tmp_path}`" in _said(at)
    assert "reads only" not in _said(_page(own, "overview"))


def test_pickers_name_audits_by_model_run_and_step_and_collapse_repeats(recs: dict, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(recs["step1"]["store_uri"], store)
    again = dict(json.loads((store / "audits" / f"{recs['step2']['audit_id']}.json").read_text()))
    again["audit_id"] = recs["step2"]["audit_id"][:-6] + "again0"  # the same model and config, run again
    again["created_at"] = "2000-01-01T00:00:00+00:00"  # before the others: the newest copy is the one kept
    (store / "audits" / f"{again['audit_id']}.json").write_text(json.dumps(again))
    at = _page(str(store), "overview")
    picker = at.sidebar.selectbox(key="_microscope_pick.sidebar_audit")
    labels = list(picker.options)
    assert any(f"{recs['step1']['run_id']} step 1" in lab for lab in labels), labels
    assert any(lab.startswith(recs["step1"]["architecture"]["class_name"]) for lab in labels), labels
    assert not any("again0" in lab for lab in labels) and len(labels) == 3, labels  # 4 records, one a repeat


def test_compare_starts_from_the_same_runs_previous_checkpoint(recs: dict) -> None:
    at = _page(recs["step1"]["store_uri"], "compare", audit=recs["step2"]["audit_id"])
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["compare"] == recs["step1"]["audit_id"]  # step 1 of the same run, not the latest audit
