"""The Streamlit viewer (`dashboard/app.py`) through `streamlit.testing.v1.AppTest`, on real finished
audits of a tiny GPT-2 (two checkpoints of one run, through the `microscope` command), a failed copy of
one of them (its metrics stage failed), and an empty store. Every page runs without an exception, shows
the audit's own figures, and says what is missing and how to produce it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

from microscope import results
from microscope.store import open_store
from tests.conftest import FINISHED_RUN

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
PAGES = ("audits", "overview", "layers", "evolution", "compare")
RUN = FINISHED_RUN


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, finished_audits: dict[str, dict]) -> dict:
    recs = {1: finished_audits["step1"], 2: finished_audits["step2"]}
    latest = finished_audits["partial"]  # the session's shared store also holds a partial audit, made last
    # a failed audit: step 1's record with its metrics stage failed (what a crashed stage leaves)
    failed = tmp_path_factory.mktemp("failed-store")
    raw = dict(recs[1], status="failed", error="metrics failed: out of memory (test)")
    raw["stages"] = dict(raw["stages"])
    raw["stages"]["metrics"] = dict(raw["stages"]["metrics"], status="failed", error="out of memory (test)")
    (failed / "audits").mkdir()
    (failed / "audits" / f"{raw['audit_id']}.json").write_text(json.dumps(raw))
    return {
        "full": recs[1]["store_uri"],
        "recs": recs,
        "latest": latest,
        "failed": str(failed),
        "failed_id": raw["audit_id"],
        "empty": str(tmp_path_factory.mktemp("empty-store")),
    }


def _page(store: str, page: str, **params: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.query_params["store"] = store
    at.query_params.update(params)
    at.run()  # st.navigation registers the pages; a switch before it would run the page without app.py
    if page != "audits":
        at.switch_page(f"pages/{page}.py").run()
    return at


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_runs_on_finished_audits(stores: dict, page: str) -> None:
    at = _page(stores["full"], page)
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["audit"] == stores["latest"]["audit_id"]  # the latest, kept in the URL


def test_audits_lists_every_audit(stores: dict) -> None:
    at = _page(stores["full"], "audits")
    ids = set(at.dataframe[0].value["audit_id"])
    assert ids == {stores["recs"][1]["audit_id"], stores["recs"][2]["audit_id"], stores["latest"]["audit_id"]}
    chosen = stores["recs"][1]["audit_id"]
    at.selectbox(key="_microscope_pick.audits_page").select(chosen).run()
    assert not at.exception and at.query_params["audit"] == chosen


def test_overview_shows_the_audits_figures(stores: dict) -> None:
    rec = stores["recs"][1]
    at = _page(stores["full"], "overview", audit=rec["audit_id"])
    assert not at.exception
    assert rec["audit_id"] in _texts(at.header)
    alpha = rec["stages"]["metrics"]["metrics"]["alpha_mean"]
    assert any(m.label == "alpha_mean" and m.value == f"{alpha:.6g}" for m in at.metric)
    kl = rec["variants"]["int8"]["quantize"]["metrics"]["kl_mean"]
    assert any(m.label == "kl_mean" and m.value == f"{kl:.6g}" for m in at.metric)
    code = _texts(at.code)
    assert rec["mlflow_run_id"] in code and rec["report_uri"] in code
    if rec.get("prefect_flow_run_id"):
        assert rec["prefect_flow_run_id"] in code
    assert "robustness" in _texts(at.info)  # not run: says how to add it


def test_layers_table_and_exports_equal_the_results_table(stores: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    added: dict[str, bytes] = {}
    original = MediaFileManager.add

    def record_add(self, path_or_data, mimetype, coordinates, file_name=None, **kw):
        added[file_name or ""] = path_or_data
        return original(self, path_or_data, mimetype, coordinates, file_name, **kw)

    monkeypatch.setattr(MediaFileManager, "add", record_add)
    rec = stores["recs"][2]
    at = _page(stores["full"], "layers", audit=rec["audit_id"])
    assert not at.exception
    store = open_store(stores["full"])
    table = results.layer_table(store, results.load_audit(store, rec["audit_id"]))
    shown = at.dataframe[0].value
    assert list(shown["name"]) == list(table["name"]) and list(shown.columns) == list(table.columns)
    prefix = f"{rec['audit_id']}-layers"
    assert added[f"{prefix}.csv"] == table.to_csv(index=False).encode()
    assert added[f"{prefix}.json"] == table.to_json(orient="records", double_precision=15).encode()
    back = pd.read_parquet(io.BytesIO(added[f"{prefix}.parquet"]))
    numeric = table.select_dtypes("number").columns
    pd.testing.assert_frame_equal(back[numeric], table[numeric])
    assert list(back["name"]) == list(table["name"])
    # a chosen matrix is in the URL
    assert at.query_params["layer"] == table["name"].iloc[0]


def test_evolution_lists_both_steps_and_follows_the_slider(stores: dict) -> None:
    at = _page(stores["full"], "evolution", run=RUN)
    assert not at.exception
    slider = at.select_slider(key="_microscope_pick.step")
    assert slider.options == ["1", "2"] and slider.value == 2
    assert at.query_params["run"] == RUN and at.query_params["step"] == "2"
    slider.set_value(1).run()
    assert not at.exception and at.query_params["step"] == "1"
    assert stores["recs"][1]["audit_id"] in _texts(at.caption)
    assert "Layer table at step 1" in _texts(at.subheader)


@pytest.mark.parametrize("page", PAGES)
def test_empty_store_says_how_to_produce_an_audit(stores: dict, page: str) -> None:
    at = _page(stores["empty"], page)
    assert not at.exception
    assert "microscope run --model" in _texts(at.info)
    missing = _page(str(Path(stores["empty"]) / "nowhere"), page)
    assert not missing.exception and "no store at" in _texts(missing.info)
    assert not (Path(stores["empty"]) / "nowhere").exists()  # the viewer never creates a store


@pytest.mark.parametrize("page", ("overview", "layers", "evolution"))
def test_a_failed_stage_is_named_with_its_error(stores: dict, page: str) -> None:
    at = _page(stores["failed"], page)
    assert not at.exception, [e.value for e in at.exception]
    said = _texts(at.warning) + _texts(at.error)
    assert "out of memory (test)" in said
    if page == "layers":  # without weight statistics the rows are the blocks
        assert set(at.dataframe[0].value["role"]) == {"block"}


def test_the_viewer_never_imports_prefect() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import dashboard.state, dashboard.charts, dashboard.exports, microscope.audits; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'); assert not bad, bad"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=APP.parents[1], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    for path in APP.parent.rglob("*.py"):
        text = path.read_text()
        assert "import prefect" not in text and "from prefect" not in text, path


def test_microscope_view_serves_the_viewer(stores: dict, tmp_path: Path) -> None:
    """`microscope view --store URI` starts Streamlit headless on the given port, on that store."""
    import subprocess

    from tests.conftest import VENV_BIN, free_port, stop, wait_http

    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "microscope"), "view", "--store", stores["full"], "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", 60, proc)
    finally:
        stop(proc)
