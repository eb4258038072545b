"""`microscope up` on a laptop, end to end: a real Prefect server, the audit deployment served by the stack,
the webhook receiver. A checkpoint announced with `microscope notify` (what the trainer callbacks send) is
audited into the same workspace that `microscope list` reads, judged against the run's previous step;
`microscope run` finds the stack and runs on its server, forked from its warm process; the console shows one line per stage (`-v`
brings Prefect's engine lines back); stopping the stack stops its children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import VENV_BIN, cli_env, free_port, run_cli

pytestmark = pytest.mark.scenario

CONFIG = """
dataset: {seq_len: 32, max_tokens: 1024}
gate:
  rules:
    - {name: spectral norm jump, metric: layers.*.spectral_norm, check: "ratio in [0.5, 2]"}
"""


def _wait(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (got := pred()) is not None:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s} s")


def _record(home: Path, step: int) -> dict | None:
    for f in (home / "artifacts" / "audits").glob("*.json"):
        rec = json.loads(f.read_text())
        if rec.get("run_id") == "laptop" and rec.get("step") == step:
            return rec
    return None


def test_the_stack_audits_announced_checkpoints_into_one_workspace(
    tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, None)
    env.pop("MICROSCOPE_WARM_SOCKET", None)  # the stack's own warm process, not the test worker's
    home = Path(env["MICROSCOPE_HOME"])
    (tmp_path / "audit.yaml").write_text(CONFIG)
    port, hook_port = free_port(), free_port()
    log = open(tmp_path / "up.log", "w")
    up = subprocess.Popen(
        [str(VENV_BIN / "microscope"), "up", "--no-ui", "--port", str(port), "--webhook-port", str(hook_port)],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        info = _wait(
            lambda: json.loads((home / "stack.json").read_text()) if (home / "stack.json").exists() else None,
            240, "stack.json",
        )  # fmt: skip
        api = info["prefect_api_url"]
        assert api == f"http://127.0.0.1:{port}/api" and info["webhook_url"].endswith(f":{hook_port}/v1/checkpoints")
        _wait(lambda: httpx.get(f"{api}/deployments/name/audit/checkpoint").status_code == 200 or None, 120, "served")
        secret = (home / "webhook.secret").read_text().strip()  # made by the stack, mode 600
        assert secret.startswith("whsec_") and (home / "webhook.secret").stat().st_mode & 0o777 == 0o600
        sender = {**env, "MICROSCOPE_WEBHOOK_URL": info["webhook_url"], "MICROSCOPE_WEBHOOK_SECRET": secret}
        for step in (1, 2):
            args = ["notify", "--checkpoint", str(tiny_gpt2_dir), "--run-id", "laptop", "--step", str(step)]
            args += ["--dataset", str(corpus_file), "--config", str(tmp_path / "audit.yaml"), "--stages", "metrics"]
            p = run_cli(args, sender, tmp_path, 120)
            assert p.returncode == 0 and "audit started" in p.stdout, p.stderr[-2000:]
        recs = {s: _wait(lambda s=s: _record(home, s), 400, f"the audit of step {s}") for s in (1, 2)}
        for rec in recs.values():
            assert rec["status"] == "completed", rec.get("error")
            assert rec["store_uri"] == str(home / "artifacts")  # the stack's workspace, not the worker's cwd
        gate = recs[2]["stages"]["gate"]["details"]
        assert gate["baseline_step"] == 1 and gate["baseline_audit_id"] == recs[1]["audit_id"]
        assert gate["verdict"] == "pass" and gate["results"][0]["compared"] == 1.0  # the same weights
        listed = run_cli(["list", "--run", "laptop"], env, tmp_path)
        assert "laptop step 2  gate pass vs step 1" in listed.stdout, listed.stdout

        # `microscope run` in the same workspace uses the stack's server (no temporary one) and is quiet
        quiet = {k: v for k, v in env.items() if k != "PREFECT_LOGGING_LEVEL"}
        args = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", "audit.yaml"]
        p = run_cli([*args, "--stages", "ingest"], quiet, tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "temporary server" not in p.stderr and "ingest: started" in p.stderr and "ingest: cached" in p.stderr
        assert "Task run" not in p.stderr and "Finished in state" not in p.stderr
        assert all(line.strip() for line in p.stderr.splitlines())  # no blank lines
        audit_id = p.stderr.split("microscope: audit ", 1)[1].split()[0]
        runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 50}).json()
        assert [r["state_type"] for r in runs if r["name"] == audit_id] == ["COMPLETED"]  # a run on the stack's server
        v = run_cli(["-v", *args, "--stages", "ingest"], quiet, tmp_path)
        assert v.returncode == 0 and "Finished in state" in v.stderr, v.stderr[-2000:]
        # the quiet run ran in the stack's warm process (imports done), the verbose one here (Prefect's own console)
        forked = [ln for ln in (home / "logs" / "warm.log").read_text().splitlines() if ": microscope run " in ln]
        assert len(forked) == 1 and "-v" not in forked[0] and info["warm_socket"], forked
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
        log.close()
    assert not (home / "stack.json").exists()
    dead = [p for p in (port, hook_port) if _answers(p)]
    assert not dead, f"ports {dead} still answer after the stack stopped: {(tmp_path / 'up.log').read_text()[-2000:]}"


def _answers(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
        return True
    except httpx.HTTPError:
        return False


def test_a_second_stack_on_a_taken_webhook_port_refuses(tmp_path: Path) -> None:
    """Another receiver on the port would take this stack's checkpoints to its own server: one line, exit 1."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    Thread(target=other.serve_forever, daemon=True).start()
    env = {**cli_env(tmp_path, None), "PREFECT_API_URL": f"http://127.0.0.1:{other.server_address[1]}/api"}
    p = run_cli(["up", "--webhook-port", str(other.server_address[1])], env, tmp_path, 120)
    other.shutdown()
    assert p.returncode == 1, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("microscope: error: port ")
    assert "already has a webhook receiver" in p.stderr
    assert os.path.exists(tmp_path / "home" / "webhook.secret")  # made before anything started, kept for next time
