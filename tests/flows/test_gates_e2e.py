"""Regression gates end to end, against a real local Prefect server: three checkpoints of one training run
of a tiny GPT-2 (step 2 unchanged, step 3 with one attention matrix scaled 3×), audited with the shipped
rules (`gate: {rules: gates}`). The gate passes at 2 and fails at 3 naming the matrix; the verdict is in
the record, the report, MLflow and a Prefect artifact; the failure is a `microscope.gate.failed` event,
which the automation `make deploy` registers turns into a notification (a custom-webhook block pointed at
a local receiver); the callback URL receives the signed verdict; `microscope gate` re-judges with exit
codes 0/1/2."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, VENV_BIN, cli_env, run_cli

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a test-only Standard Webhooks secret
SCALED = "transformer.h.1.attn.c_attn.weight"
CONFIG = """
dataset: {seq_len: 32, max_tokens: 1024}
metrics: {sensitivity: false, weight_shards: 1}
gate: {rules: gates}
"""


class Receiver:
    """A local HTTP endpoint keeping every POST: the notification block's target and the callback URL."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str], str]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                sink.posts.append((self.path, dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, path: str, timeout: float = 90) -> list[tuple[dict[str, str], str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [(h, b) for p, h, b in self.posts if p == path]
            if got:
                return got
            time.sleep(0.5)
        raise AssertionError(f"nothing was POSTed to {path} within {timeout} s (got {[p for p, _, _ in self.posts]})")


def checkpoints(src: Path, root: Path) -> dict[int, Path]:
    import torch
    from safetensors.torch import load_file, save_file

    out = {1: src}
    for step in (2, 3):
        dst = root / f"step-{step}"
        shutil.copytree(src, dst)
        if step == 3:
            tensors = load_file(str(dst / "model.safetensors"))
            tensors[SCALED] = (tensors[SCALED] * 3.0).contiguous()
            save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
            assert torch.equal(load_file(str(dst / "model.safetensors"))[SCALED], tensors[SCALED])
        out[step] = dst
    return out


def python(code: str, env: dict[str, str]) -> str:
    p = subprocess.run([str(VENV_BIN / "python"), "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path) -> dict:
    root = tmp_path_factory.mktemp("gates")
    (root / "audit.yaml").write_text(CONFIG)
    env = cli_env(root, prefect_api, MICROSCOPE_WEBHOOK_SECRET=SECRET, MICROSCOPE_CALLBACK_ALLOW_PRIVATE="true")
    alerts = Receiver()
    # The team's notification block and the automation `make deploy` registers for it (register.py's code).
    python(
        "from prefect.blocks.notifications import CustomWebhookNotificationBlock as B\n"
        f"B(name='gate-alerts', url='{alerts.url}/alert', allow_private_urls=True,"
        " json_data={'subject': '{{subject}}', 'body': '{{body}}'}).save('gate-alerts', overwrite=True)\n",
        env,
    )
    said = python(
        "from deployments.register import ensure_gate_automation\n"
        "print(ensure_gate_automation('custom-webhook/gate-alerts'))\n"
        "print(ensure_gate_automation('custom-webhook/gate-alerts'))\n",
        env,
    ).splitlines()
    assert said[0].endswith("created, sending to custom-webhook/gate-alerts") and said[1].endswith("unchanged")
    ck = checkpoints(tiny_gpt2_dir, root)
    recs = {}
    for step, path in ck.items():
        args = ["run", "--model", str(path), "--dataset", str(corpus_file), "--config", "audit.yaml"]
        stages = "ingest,metrics,report" if step == 3 else "ingest,metrics"  # the report is read at step 3
        args += ["--stages", stages, "--run-id", "gate-run", "--step", str(step), "--json"]
        if step == 3:
            args += ["--callback-url", f"{alerts.url}/callback"]
        p = run_cli(args, env, root)
        assert p.returncode == 0, p.stderr[-3000:]
        recs[step] = json.loads(p.stdout)
    return {"recs": recs, "env": env, "root": root, "alerts": alerts, "api": prefect_api}


def events_of(api: httpx.Client, name: str, at_least: int, resource: dict | None = None) -> list[dict]:
    """The server's events named `name`, polled until at least `at_least` are stored (the event persister
    writes in batches, a few seconds after the event)."""
    body: dict[str, Any] = {"filter": {"event": {"name": [name]}} | ({"resource": resource} if resource else {})}
    deadline = time.monotonic() + 60
    while True:
        found = api.post("/events/filter", json=body).json()["events"]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(1)


def verdict(rec: dict) -> dict:
    assert rec["stages"]["gate"]["status"] == "completed", rec["stages"]["gate"]
    return rec["stages"]["gate"]["details"]


def by_rule(v: dict) -> dict[str, dict]:
    return {r["rule"]: r for r in v["results"]}


def test_the_gate_passes_an_unchanged_checkpoint_and_fails_the_damaged_one(gated: dict) -> None:
    recs = gated["recs"]
    first, second, third = verdict(recs[1]), verdict(recs[2]), verdict(recs[3])
    assert first["baseline_audit_id"] is None and "first audited checkpoint" in first["baseline_reason"]
    assert by_rule(first)["spectral norm jump"]["outcome"] == "skipped"  # no baseline: never a pass
    assert first["verdict"] != "fail"
    # audited one after another: nothing was in progress to wait for, and every audit dropped its marker
    assert all(v["baseline_waited_for"] is None for v in (first, second, third))
    marks = gated["root"] / "home" / "artifacts" / "audits" / "in-flight"
    assert marks.is_dir() and not list(marks.glob("*.json"))
    assert second["baseline_audit_id"] == recs[1]["audit_id"] and second["verdict"] in ("pass", "warn")
    sn2 = by_rule(second)["spectral norm jump"]
    assert sn2["outcome"] == "pass" and sn2["compared"] == pytest.approx(1.0, abs=1e-9)  # same weights
    assert third["baseline_audit_id"] == recs[2]["audit_id"] and third["verdict"] == "fail"
    sn3 = by_rule(third)["spectral norm jump"]
    assert sn3["outcome"] == "fail" and [o["key"] for o in sn3["offenders"]] == [SCALED]
    assert sn3["offenders"][0]["compared"] == pytest.approx(3.0, rel=1e-4)  # σmax scales with the matrix
    # the spectral norms themselves, from the metrics records: ratio recomputed by hand
    w2 = {w["name"]: w for w in recs[2]["stages"]["metrics"]["details"]["weights"]}
    w3 = {w["name"]: w for w in recs[3]["stages"]["metrics"]["details"]["weights"]}
    assert sn3["offenders"][0]["value"] == w3[SCALED]["spectral_norm"]
    assert sn3["offenders"][0]["compared"] == pytest.approx(w3[SCALED]["spectral_norm"] / w2[SCALED]["spectral_norm"])
    # α of a uniformly scaled matrix does not move: the alpha-shift rule does not name it
    assert SCALED not in [o["key"] for o in by_rule(third)["alpha shift"]["offenders"]]
    html = Path(recs[3]["report_uri"]).read_text()
    assert '<h2>Gate: <span class="bad">FAIL</span></h2>' in html and SCALED in html
    assert html.index("<h2>Gate") < html.index("<h2>Stages</h2>")  # the verdict first


def test_the_verdict_reaches_mlflow_and_prefect(gated: dict) -> None:
    from mlflow import MlflowClient

    rec = gated["recs"][3]
    client = MlflowClient(f"sqlite:///{gated['root'] / 'home' / 'mlflow.db'}")
    run = client.get_run(rec["mlflow_run_id"])
    assert run.data.tags["gate"] == "fail" and run.data.tags["gate.baseline"] == gated["recs"][2]["audit_id"]
    assert run.data.metrics["gate.spectral norm jump"] == pytest.approx(3.0, rel=1e-4)
    assert run.data.metrics["gate.failed"] >= 1
    assert client.get_run(gated["recs"][2]["mlflow_run_id"]).data.tags["gate"] in ("pass", "warn")
    api = httpx.Client(base_url=gated["api"], timeout=30)
    body = {"artifacts": {"key": {"any_": ["gate"]}, "flow_run_id": {"any_": [rec["prefect_flow_run_id"]]}}}
    arts = api.post("/artifacts/filter", json=body).json()
    assert len(arts) == 1 and "FAIL" in arts[0]["data"] and SCALED in arts[0]["data"]
    who = {"id": [f"microscope.audit.{rec['audit_id']}"]}
    events = events_of(api, "microscope.gate.failed", resource=who, at_least=1)
    assert len(events) == 1
    ev = events[0]
    assert ev["resource"]["microscope.run_id"] == "gate-run" and ev["resource"]["microscope.step"] == "3"
    assert ev["payload"]["failed"] and SCALED in ev["payload"]["offenders"]["spectral norm jump"]
    passed = events_of(api, "microscope.gate.passed", at_least=2)
    assert {e["resource"]["microscope.step"] for e in passed} >= {"1", "2"}


def test_the_automation_notifies_and_the_callback_gets_the_signed_verdict(gated: dict) -> None:
    from standardwebhooks.webhooks import Webhook

    rec = gated["recs"][3]
    alerts = gated["alerts"].wait_for("/alert")
    assert len(alerts) == 1  # steps 1 and 2 passed: only step 3's failure is sent
    body = json.loads(alerts[0][1])
    assert "gate failed" in body["subject"] and "step 3" in body["subject"]
    assert rec["audit_id"] in body["body"] and SCALED in body["body"] and "spectral norm jump" in body["body"]
    headers, raw = gated["alerts"].wait_for("/callback")[0]
    result = Webhook(SECRET).verify(raw, headers)  # signed: a forged result would be refused
    assert result["audit_id"] == rec["audit_id"] and result["gate"]["verdict"] == "fail"
    assert result["gate"] == verdict(rec)


def test_microscope_gate_rejudges_with_exit_codes(gated: dict, tmp_path: Path) -> None:
    env, root, recs = gated["env"], gated["root"], gated["recs"]
    p = run_cli(["gate", recs[3]["audit_id"], "--baseline", "previous", "--rules", "gates"], env, root)
    assert p.returncode == 1 and SCALED in p.stdout and p.stdout.strip().splitlines()[-1].startswith("gate fail")
    p = run_cli(["gate", recs[3]["audit_id"], "--baseline", recs[1]["audit_id"], "--json"], env, root)
    assert p.returncode == 1 and json.loads(p.stdout)["baseline_audit_id"] == recs[1]["audit_id"]
    p = run_cli(["gate", recs[2]["audit_id"], "--baseline", "first", "--save", "--json"], env, root)
    saved = json.loads((root / "home" / "artifacts" / "audits" / f"{recs[2]['audit_id']}.json").read_text())
    assert p.returncode == 0 and saved["stages"]["gate"]["details"] == json.loads(p.stdout)  # kept in the record
    assert saved["stages"]["gate"]["details"]["baseline_spec"] == "first"
    assert run_cli(["gate", recs[3]["audit_id"], "--baseline", "none"], env, root).returncode == 0  # relative skipped
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - metric: layers.*.alfa\n    check: <= 3\n")
    for args, said in (
        (["gate", recs[3]["audit_id"], "--rules", str(bad)], "no layer-table column"),
        (["gate", recs[3]["audit_id"], "--baseline", "nope"], "baseline 'nope' is no audit"),
    ):
        p = run_cli(args, env, root)
        assert p.returncode == 2 and said in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
