"""The Launch page (`dashboard/views/launch.py`) through Streamlit's AppTest and `flows.launch`: a wrong field is
one line naming it, the pre-flight estimate of the tiny GPT-2 shows its own parameter count (the loaded model's),
"Start audit" creates a flow run of the audit deployment on a real Prefect server with the form's parameters
(read back with the Prefect client; no worker runs it), and a local run (`microscope run`, ingest only) is
followed until its record is saved."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from flows import launch
from microscope import results
from microscope.store import open_store

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
VIEW = APP.parent / "views" / "launch.py"
K = "_microscope_launch."
REGISTERED = "launch.py" in APP.read_text()
SMALL = "dataset:\n  seq_len: 32\n  max_tokens: 256\n"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated workspace; no Prefect server and no warm process unless a test names them."""
    monkeypatch.setenv("MICROSCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    for name in ("MICROSCOPE_STORE", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MICROSCOPE_WARM_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "audit.yaml").write_text(SMALL)
    return tmp_path


def _page() -> AppTest:
    """The page through app.py's navigation once it is registered there, else on its own."""
    if REGISTERED:
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        return at.switch_page("views/launch.py").run()
    return AppTest.from_file(str(VIEW), default_timeout=60).run()


def _fill(at: AppTest, **fields: str) -> AppTest:
    for name, value in fields.items():
        widget = at.text_area(key=K + name) if name == "tags" else at.text_input(key=K + name)
        widget.set_value(value)
    return at


def _click(at: AppTest, label: str) -> AppTest:
    return next(b for b in at.button if b.label == label).click().run()


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("layers", "first, last", "layers:"), ("tags", "branch main", "tags:"), ("step", "ten", "step:")],
)
def test_a_wrong_field_is_one_line_naming_it(
    workspace: Path, tiny_gpt2_dir: Path, corpus_file: Path, field: str, value: str, named: str
) -> None:
    at = _fill(_page(), model=str(tiny_gpt2_dir), dataset=str(corpus_file), run_id="r", **{field: value})
    at = _click(at, "Estimate")
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith(named) and "\n" not in errors[0], errors
    assert not at.metric  # no estimate beside the error


def test_a_missing_model_is_named(workspace: Path, corpus_file: Path) -> None:
    at = _click(_fill(_page(), model=str(workspace / "nowhere"), dataset=str(corpus_file)), "Start audit")
    assert [e.value for e in at.error] == [
        f"model: {workspace / 'nowhere'} does not exist; pass an HF folder, a weights file or a hub id"
    ]
    assert K + "handle" not in at.session_state


def test_the_estimate_of_the_tiny_gpt2(workspace: Path, tiny_gpt2_dir: Path, corpus_file: Path) -> None:
    from transformers import AutoModelForCausalLM

    at = _fill(_page(), model=str(tiny_gpt2_dir), dataset=str(corpus_file), config=str(workspace / "audit.yaml"))
    at.multiselect(key=K + "formats").set_value(["nf4", "fp16"])
    at = _click(at, "Estimate")
    assert not at.exception and not at.error, [e.value for e in at.error]
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).parameters())
    shown = {m.label: m.value for m in at.metric}
    assert shown["parameters"] == f"{n:,}"
    table = at.dataframe[0].value.set_index("format")
    assert list(table.index) == ["fp", "nf4", "fp16"]
    assert table.loc["fp", "bytes"] == 4 * n and table.loc["fp16", "bytes"] == 2 * n  # every weight at 2 bytes
    assert set(table["fits"]) == {"yes"}
    assert "fits" in _texts(at.success)  # the recommendation: the full-precision model fits


@pytest.fixture
def deployment(prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The audit flow registered on the real server as a served deployment (how `microscope up` registers it),
    under a name of this test's own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.audit import audit

    name = f"launch-{uuid.uuid4().hex[:8]}"
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}):
        audit.to_deployment(name=name).apply()
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    monkeypatch.setenv("MICROSCOPE_AUDIT_DEPLOYMENT", f"audit/{name}")
    yield name


def test_start_creates_a_flow_run_of_the_deployment(
    workspace: Path, deployment: str, prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    at = _page()
    assert at.radio(key=K + "via").value == "deployment"  # a server is configured: the deployment by default
    fields = dict(model=str(tiny_gpt2_dir), dataset=str(corpus_file), config=str(workspace / "audit.yaml"))
    at = _fill(at, **fields, run_id="run-a", step="7", tags="branch=main\nowner = ml")
    at.multiselect(key=K + "stages").set_value(["ingest"])
    at.multiselect(key=K + "formats").set_value(["fp16"])
    at = _click(at, "Start audit")
    assert not at.exception and not at.error, [e.value for e in at.error]
    handle = at.session_state[K + "handle"]
    assert handle.kind == "deployment" and handle.flow_run_id

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        fr = client.read_flow_run(uuid.UUID(handle.flow_run_id))
        dep = client.read_deployment_by_name(f"audit/{deployment}")
        try:
            assert fr.deployment_id == dep.id
            p = fr.parameters
            assert (p["model"], p["dataset"]) == (str(tiny_gpt2_dir), str(corpus_file))
            assert (p["run_id"], p["step"], p["stages"]) == ("run-a", 7, ["ingest"])
            assert p["tags"] == {"branch": "main", "owner": "ml"}
            assert p["audit_id"] == handle.audit_id and p["store"] == handle.store
            assert p["config"]["dataset"]["seq_len"] == 32 and p["config"]["quantize"]["formats"] == ["fp16"]
            # no worker serves it: the run waits, and the page says so per stage
            progress = launch.progress(handle)
            assert progress.state == "scheduled" and not progress.finished
            assert progress.stages == {"ingest": "pending"}
            assert "scheduled" in _texts(at.caption).lower()
        finally:
            client.delete_flow_run(fr.id)


def test_a_local_run_is_followed_until_its_record_exists(
    workspace: Path, prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the server serves the CLI's flow run (instead of a temporary one per audit); "this machine" is chosen
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    at = _page()
    at.radio(key=K + "via").set_value("local")
    at = _fill(at, model=str(tiny_gpt2_dir), dataset=str(corpus_file), config=str(workspace / "audit.yaml"))
    at.multiselect(key=K + "stages").set_value(["ingest"])
    at = _click(at, "Start audit")
    assert not at.exception and not at.error, [e.value for e in at.error]
    handle = at.session_state[K + "handle"]
    assert handle.kind == "local" and handle.pid and Path(handle.log).is_file()
    assert Path(handle.log).parent == workspace / "home" / "launch"

    seen = set()
    deadline = time.monotonic() + 300  # a bound on waiting, not a speed assertion
    while K + "done" not in at.session_state and time.monotonic() < deadline:
        seen.add(launch.progress(handle).state)
        time.sleep(1)
        at.run()  # AppTest has no timer: each run polls as the fragment's run_every would
    assert K + "done" in at.session_state, Path(handle.log).read_text()[-2000:]
    done = at.session_state[K + "done"]
    assert done.state == "completed" and done.stages["ingest"] == "completed", done.message
    assert seen <= {"running", "completed"}
    rec = results.load_audit(open_store(handle.store), handle.audit_id)
    assert rec.stages["ingest"].status.value == "completed"
    assert rec.model.source == str(tiny_gpt2_dir) and rec.dataset_source == str(corpus_file)
    assert rec.config["dataset"]["seq_len"] == 32
    assert launch.progress(handle).finished
    # the log's stage lines, read as while the record was not yet written (another, empty store)
    elsewhere = replace(handle, store=str(workspace / "other-store"), pid=None)
    (workspace / "other-store").mkdir()
    from_log = launch.progress(elsewhere)
    assert from_log.state == "crashed" and from_log.stages == {"ingest": "completed"}, Path(handle.log).read_text()
    assert any(b.label == "Open the audit" for b in at.button)
    if REGISTERED:  # the button opens the audit's overview (switch_page needs app.py's navigation)
        at = _click(at, "Open the audit")
        assert not at.exception and at.query_params["audit"] == handle.audit_id
        assert handle.audit_id in _texts(at.header)
