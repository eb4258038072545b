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
PAGES = tuple(p.stem for p in sorted((APP.parent / "views").glob("*.py")))
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
        at.switch_page(f"views/{page}.py").run()
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
    assert any("Layer table at step 1" in e.label for e in at.expander)


def test_evolution_plays_the_run(stores: dict) -> None:
    at = _page(stores["full"], "evolution", run=RUN, step="1")
    assert at.select_slider(key="_microscope_pick.step").value == 1
    at.button[0].click().run()  # ▶ Play: the step panel advances on each tick (a rerun of its fragment)
    assert not at.exception and at.query_params["step"] == "2"
    assert at.session_state["_microscope_playing"]
    at.run()  # the next tick finds the last step: playback stops there
    assert at.query_params["step"] == "2" and not at.session_state["_microscope_playing"]
    assert at.button[0].label == "▶ Play"
    assert "variance explained" in _texts(at.caption)  # the aligned projection is drawn


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


@pytest.fixture
def indexed(stores: dict, monkeypatch: pytest.MonkeyPatch) -> str:
    """The settings of the workspace that made the audits (its Qdrant folder, read as a snapshot)."""
    monkeypatch.setenv("MICROSCOPE_HOME", str(Path(stores["full"]).parent))
    monkeypatch.delenv("QDRANT_URL", raising=False)
    return stores["full"]


def test_architecture_shows_the_modules_and_memory(stores: dict) -> None:
    rec = stores["recs"][1]
    at = _page(stores["full"], "architecture", audit=rec["audit_id"])
    assert not at.exception
    arch = rec["architecture"]
    assert any(m.label == "parameters" and m.value == f"{arch['n_params']:,}" for m in at.metric)
    modules = at.dataframe[0].value
    assert list(modules["name"]) == [m["name"] for m in arch["modules"]]
    assert list(modules["params"]) == [m["params"] for m in arch["modules"]]
    assert any("MiB[int8]" in d.value.columns for d in at.dataframe)


def test_sae_page_shows_a_feature_and_its_fate(stores: dict, indexed: str) -> None:
    rec = stores["recs"][2]
    hook = "blocks.1.hook_resid_post"
    store = open_store(indexed)
    record = results.load_audit(store, rec["audit_id"])
    table = results.features(store, record, hook)
    feature = int(table.loc[table["density"] > 0, "feature"].iloc[0])
    at = _page(indexed, "sae", audit=rec["audit_id"], hook=hook, feature=str(feature))
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["hook"] == hook and at.query_params["feature"] == str(feature)
    shown = at.dataframe[0].value
    assert set(shown["feature"]) == set(table.loc[table["density"] > 0, "feature"])
    contexts = results.feature_contexts(store, record, hook, feature)
    page = "\n".join(str(h.proto.body) for h in at.get("html"))
    assert contexts and all(t.replace("<", "&lt;").replace(">", "&gt;") in page for t in contexts[0]["tokens"])
    assert f"{contexts[0]['activations'][contexts[0]['center']]:.4g}" in page  # the top token's shade title
    tables = [d.value for d in at.dataframe]
    fate_v = next(t for t in tables if "fate" in t.columns)
    assert fate_v.iloc[0]["variant"] == "int8" and fate_v.iloc[0]["fate"] in ("survived", "drifted", "lost")
    fate_run = next(t for t in tables if "split_into" in t.columns)
    assert list(fate_run["step"]) == [1, 2]  # followed back to step 1 through the stored matches
    near = next(t for t in tables if "top tokens" in t.columns)  # Qdrant, through a snapshot of its folder
    assert len(near) and (near["cosine"] <= 1 + 1e-6).all()
    at.number_input(key="_microscope_pick.feature").set_value(feature + 1).run()
    assert not at.exception and at.query_params["feature"] == str(feature + 1)


def test_quantization_page_shows_the_variants(stores: dict) -> None:
    rec = stores["recs"][1]
    at = _page(stores["full"], "quantization", audit=rec["audit_id"])
    assert not at.exception
    kl = rec["variants"]["int8"]["quantize"]["metrics"]["kl_mean"]
    assert any(m.label == "kl_mean" and m.value == f"{kl:.4g}" for m in at.metric)
    drift = next(d.value for d in at.dataframe if "rel_error" in d.value.columns)
    assert set(drift["hook"]) == set(rec["variants"]["int8"]["quantize"]["details"]["drift"])


def test_robustness_page_on_a_vision_audit(finished_vision: dict) -> None:
    at = _page(finished_vision["store_uri"], "robustness")
    assert not at.exception, [e.value for e in at.exception]
    aa = next(d.value for d in at.dataframe if "robust_accuracy" in d.value.columns)
    fp = finished_vision["stages"]["robustness"]["details"]["autoattack"][0]["robust"]
    assert aa.set_index("variant").loc["fp", "robust_accuracy"] == fp
    assert "SAE" in _texts(at.info)  # no brittle features without an SAE: says how to get them
    for page in ("overview", "architecture", "layers", "quantization", "sae"):  # a CNN: nothing raises
        other = _page(finished_vision["store_uri"], page)
        assert not other.exception, (page, [e.value for e in other.exception])


def test_reliability_page_on_a_vision_audit(finished_vision: dict) -> None:
    at = _page(finished_vision["store_uri"], "reliability")
    assert not at.exception, [e.value for e in at.exception]
    table = next(d.value for d in at.dataframe if "ece_after_ts" in d.value.columns).set_index("variant")
    fp = finished_vision["stages"]["reliability"]["metrics"]
    assert set(table.index) == {"fp", "torch-int8"}
    assert table.loc["fp", "ece"] == fp["ece"] and table.loc["fp", "temperature"] == fp["temperature"]
    ood = next(d.value for d in at.dataframe if "fpr95_ood_positive" in d.value.columns)
    details = finished_vision["stages"]["reliability"]["details"]["ood"]
    row = ood[(ood["variant"] == "fp") & (ood["ood_set"] == "uniform-noise") & (ood["score"] == "energy")]
    assert row.iloc[0]["auroc"] == details["uniform-noise"]["energy"]["auroc"]
    assert "FPR95" in " ".join(c.value for c in at.caption)  # the conventions are stated beside the figures
    sm = next(d.value for d in at.dataframe if "abstained" in d.value.columns).set_index("variant")
    cert = finished_vision["stages"]["reliability"]["details"]["smoothing"]["0.25"]
    assert sm.loc["fp", "abstained"] == cert["abstained"] and sm.loc["fp", "r=0.5"] == cert["certified_accuracy"]["0.5"]


def test_search_finds_the_same_matrix_in_the_other_checkpoint(stores: dict, indexed: str) -> None:
    rec = stores["recs"][2]
    name = rec["stages"]["metrics"]["details"]["weights"][0]["name"]
    at = _page(indexed, "search", audit=rec["audit_id"], what="layers", layer=name)
    assert not at.exception, [e.value for e in at.exception]
    hits = at.dataframe[0].value
    twin = hits[(hits["audit"] == stores["recs"][1]["audit_id"]) & (hits["matrix"] == name)]
    assert len(twin) == 1 and twin.iloc[0]["similarity"] == pytest.approx(1.0, abs=1e-5)  # same weights
