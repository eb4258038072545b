"""The webhook receiver, for real: `microscope webhook serve` (uvicorn) in front of a real Prefect server
with the deployments registered by `make deploy`. Signatures are made here with the `standardwebhooks`
package itself, not with our sender, so the two sides are checked against the reference."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, VENV_BIN, free_port, make_deploy, prefect_server, wait_http

SECRET_OLD = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET_NEW = "whsec_" + "aGVsbG8gdGhpcyBpcyBhIG5ldyBzZWNyZXQ="


def sign(body: str, secret: str = SECRET_OLD, msg_id: str | None = None, at: datetime | None = None) -> dict[str, str]:
    from standardwebhooks.webhooks import Webhook

    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body),
        "content-type": "application/json",
    }


def body_of(**fields: Any) -> str:
    return json.dumps({"checkpoint": "s3://ckpts/run1/step-100", "run_id": "run1", "step": 100} | fields)


def deploy(api_url: str, home: Path) -> None:
    make_deploy(_env(api_url, home))


def _env(api_url: str, home: Path, **extra: str) -> dict[str, str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("MICROSCOPE_", "PREFECT_", "MLFLOW_"))}
    return (
        base
        | {
            "PREFECT_API_URL": api_url,
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MICROSCOPE_HOME": str(home / "ms"),
            "MICROSCOPE_WEBHOOK_SECRET": f"{SECRET_OLD} {SECRET_NEW}",
        }
        | extra
    )


class Receiver:
    def __init__(self, url: str, log: Path):
        self.url = url
        self.log = log
        # A fresh connection per request: the receiver (uvicorn) closes a keep-alive connection idle for 5 s,
        # and a pooled one reused in that instant fails with "Server disconnected" (seen under load in CI).
        self.http = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))

    def post(self, body: str | bytes, headers: dict[str, str]) -> httpx.Response:
        return self.http.post("/v1/checkpoints", content=body, headers=headers)

    def deliver(self, body: str, headers: dict[str, str], attempts: int = 6) -> httpx.Response:
        """As a conforming sender does: a 503 (Prefect busy: SQLite answers `database is locked` under load)
        is retried with the same message id and a fresh signature, so acceptance is still exactly once."""
        r = self.post(body, headers)
        for attempt in range(attempts - 1):
            if r.status_code != 503:
                break
            time.sleep(min(0.5 * 2**attempt, 4.0))  # backing off as senders do: 0.5, 1, 2, 4, 4 s
            r = self.post(body, sign(body, msg_id=headers["webhook-id"]))
        return r

    def post_retrying(self, body: str, headers: dict[str, str], attempts: int = 6) -> httpx.Response:
        """POST; a 503 (Prefect busy) is retried with the very same request (signature, timestamp, id)."""
        r = self.post(body, headers)
        for attempt in range(attempts - 1):
            if r.status_code != 503:
                break
            time.sleep(min(0.5 * 2**attempt, 4.0))
            r = self.post(body, headers)
        return r

    def access_log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def server_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("webhook")


@pytest.fixture(scope="module")
def prefect_port() -> int:
    return free_port()


def spawn_receiver(
    api_url: str, home: Path, port: int | None = None, **extra: str
) -> tuple[subprocess.Popen, Receiver]:
    """`microscope webhook serve` on `port` (default: a free one) with `extra` settings, not yet answering."""
    port = port or free_port()
    log = home / f"receiver-{port}.log"
    proc = subprocess.Popen(
        [str(VENV_BIN / "microscope"), "webhook", "serve", "--port", str(port)],
        env=_env(api_url, home, **extra),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    return proc, Receiver(f"http://127.0.0.1:{port}", log)


def start_receiver(api_url: str, home: Path, **extra: str) -> tuple[subprocess.Popen, Receiver]:
    proc, rec = spawn_receiver(api_url, home, **extra)
    wait_http(f"{rec.url}/healthz", 60, proc)
    return proc, rec


@pytest.fixture(scope="module")
def receiver(server_home: Path, prefect_port: int) -> Iterator[Receiver]:
    """The receiver, started while its Prefect server is still down (the first test sees the 503)."""
    proc, rec = start_receiver(f"http://127.0.0.1:{prefect_port}/api", server_home)
    yield rec
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def prefect(server_home: Path, prefect_port: int, receiver: Receiver) -> Iterator[httpx.Client]:
    """The Prefect server comes up after the receiver, on the port the receiver was told."""
    with prefect_server(server_home, port=prefect_port) as url:
        deploy(url, server_home)
        yield httpx.Client(base_url=url, timeout=30)


def flow_runs(prefect: httpx.Client) -> list[dict[str, Any]]:
    r = prefect.post("/flow_runs/filter", json={"limit": 200})
    r.raise_for_status()
    return r.json()


def test_prefect_down_is_503_then_the_retry_creates_the_run(receiver: Receiver, server_home: Path, request) -> None:
    body = body_of(run_id="run-outage", step=7)
    headers = sign(body)
    r = receiver.post(body, headers)
    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
    assert "retry later" in r.json()["detail"]
    prefect = request.getfixturevalue("prefect")  # the server comes back
    r = receiver.deliver(body, sign(body, msg_id=headers["webhook-id"]))  # the sender's retry: same id, new signature
    assert r.status_code == 202, r.text
    assert r.json()["duplicate"] is False
    runs = [fr for fr in flow_runs(prefect) if fr["parameters"].get("run_id") == "run-outage"]
    assert [fr["id"] for fr in runs] == [r.json()["flow_run_id"]]


def test_delivery_creates_one_flow_run_and_redelivery_finds_it(receiver: Receiver, prefect: httpx.Client) -> None:
    body = body_of(tags={"lr": "3e-4"}, dataset="s3://data/val.txt", stages=["ingest"])
    headers = sign(body)
    r = receiver.deliver(body, headers)
    assert r.status_code == 202, r.text
    first = r.json()
    assert first["deployment"] == "audit/checkpoint" and first["duplicate"] is False
    fr = prefect.get(f"/flow_runs/{first['flow_run_id']}").json()
    dep = prefect.get("/deployments/name/audit/checkpoint").json()
    assert fr["deployment_id"] == dep["id"]
    assert fr["parameters"] == {
        "model": "s3://ckpts/run1/step-100",
        "run_id": "run1",
        "step": 100,
        "dataset": "s3://data/val.txt",
        "stages": ["ingest"],
        "tags": {"lr": "3e-4"},
    }
    # the same delivery again (a sender's retry), and the same content under another id and secret
    again = receiver.deliver(body, sign(body, msg_id=headers["webhook-id"]))
    other = receiver.deliver(body_of(), sign(body_of(), secret=SECRET_NEW))
    for resp in (again, other):
        assert resp.status_code == 202, resp.text
        assert resp.json() == {**first, "duplicate": True}
    assert sum(1 for f in flow_runs(prefect) if f["parameters"].get("run_id") == "run1") == 1


def test_a_checkpoint_announced_again_after_its_audit_failed_is_audited_again(
    receiver: Receiver, prefect: httpx.Client
) -> None:
    """A crashed audit (its worker killed, a stack stopped mid-run) is no answer to a re-announcement: a new
    run starts, once however many deliveries race; a scheduled, running or completed one is the duplicate."""
    body = body_of(run_id="run-reaudit", step=3)
    first = receiver.deliver(body, sign(body)).json()
    assert first["duplicate"] is False
    state = {"state": {"type": "CRASHED", "name": "Crashed"}, "force": True}
    assert prefect.post(f"/flow_runs/{first['flow_run_id']}/set_state", json=state).status_code in (200, 201)
    again = [receiver.deliver(body, sign(body)).json() for _ in range(2)]  # two senders' re-announcements
    assert again[0]["duplicate"] is False and again[0]["flow_run_id"] != first["flow_run_id"]
    assert again[1] == {**again[0], "duplicate": True}
    runs = [fr for fr in flow_runs(prefect) if fr["parameters"].get("run_id") == "run-reaudit"]
    assert sorted(fr["id"] for fr in runs) == sorted([first["flow_run_id"], again[0]["flow_run_id"]])
    retry = prefect.get(f"/flow_runs/{again[0]['flow_run_id']}").json()
    assert retry["idempotency_key"].endswith(f"-after-{first['flow_run_id']}")


def test_refusals_create_nothing(receiver: Receiver, prefect: httpx.Client) -> None:
    before = len(flow_runs(prefect))
    body = body_of(run_id="refused", step=1)
    stale = sign(body, at=datetime.now(UTC) - timedelta(minutes=6))
    future = sign(body, at=datetime.now(UTC) + timedelta(minutes=6))
    tampered = sign(body)
    cases = {
        "no signature": (receiver.post(body, {"content-type": "application/json"}), 401),
        "wrong secret": (receiver.post(body, sign(body, secret="whsec_" + "d3Jvbmcgc2VjcmV0IGtleQ==")), 401),
        "tampered": (receiver.post(body.replace('"step": 1', '"step": 2'), tampered), 401),
        "stale": (receiver.post(body, stale), 401),
        "from the future": (receiver.post(body, future), 401),
        "garbage signature": (receiver.post(body, {**sign(body), "webhook-signature": "v1"}), 401),
        "not JSON": (receiver.post("{not json", sign("{not json")), 422),
        "step missing": (receiver.post(b := json.dumps({"checkpoint": "x", "run_id": "r"}), sign(b)), 422),
        "negative step": (receiver.post(b := body_of(step=-1), sign(b)), 422),
        "unknown field": (receiver.post(b := body_of(stpe=3), sign(b)), 422),
        "oversized": (receiver.post(b := body_of(tags={"pad": "x" * (1 << 20)}), sign(b)), 413),
    }
    for name, (resp, status) in cases.items():
        assert resp.status_code == status, (name, resp.status_code, resp.text)
        assert "detail" in resp.json(), name
    assert "timestamp" in cases["stale"][0].json()["detail"]
    assert cases["step missing"][0].json()["detail"] == "step: Field required"
    assert "stpe" in cases["unknown field"][0].json()["detail"]
    assert len(flow_runs(prefect)) == before


def test_hostile_fields_are_refused_naming_them(receiver: Receiver, prefect: httpx.Client) -> None:
    """Issue 21 #9: what was accepted with 202 and turned into flow runs: no coercion of the step, a step a
    BIGINT holds, no file:// or '..' checkpoints, no NUL in a run id, stage names from the list."""
    before = len(flow_runs(prefect))
    cases = {
        "checkpoint": [body_of(checkpoint="file:///etc/passwd"), body_of(checkpoint="../../../../etc/passwd")],
        "run_id": [body_of(run_id="a\u0000b")],
        "step": [body_of(step="7"), body_of(step=True), body_of(step=10**30), body_of(step=1.5)],
        "stages": [body_of(stages=["ingest", "nope"])],
        "tags": [body_of(tags={"k": "line\nbreak"})],
    }
    for field, bodies in cases.items():
        for b in bodies:
            resp = receiver.post(b, sign(b))
            assert resp.status_code == 422, (b, resp.status_code, resp.text)
            assert resp.json()["detail"].startswith(f"{field}"), (b, resp.json())
    assert len(flow_runs(prefect)) == before


def test_status_schema_health_metrics_and_log(receiver: Receiver, prefect: httpx.Client) -> None:
    body = body_of(run_id="status", step=3)
    accepted = receiver.deliver(body, sign(body)).json()
    path = f"/v1/checkpoints/{accepted['flow_run_id']}"
    st = receiver.http.get(path, headers=sign(""))
    assert st.status_code == 200 and st.json()["state"] == "SCHEDULED", st.text
    assert receiver.http.get(path).status_code == 401  # figures and report locations are not public
    assert receiver.http.get("/v1/checkpoints/not-a-uuid", headers=sign("")).status_code == 422
    assert receiver.http.get(f"/v1/checkpoints/{uuid.uuid4()}", headers=sign("")).status_code == 404

    from schemas.webhook import CheckpointReady

    published = json.loads((REPO / "schemas/json/checkpoint-ready.json").read_text())
    assert receiver.http.get("/v1/schema").json() == CheckpointReady.model_json_schema() == published
    assert receiver.http.get("/healthz").json() == {"status": "ok"}
    assert receiver.http.get("/readyz").status_code == 200

    text = receiver.http.get("/metrics").text
    counts = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("microscope_webhook_deliveries_total")
    }
    assert counts['microscope_webhook_deliveries_total{outcome="accepted",reason=""}'] >= 3
    assert counts['microscope_webhook_deliveries_total{outcome="duplicate",reason=""}'] >= 2
    assert counts['microscope_webhook_deliveries_total{outcome="refused",reason="signature"}'] >= 6
    assert counts['microscope_webhook_deliveries_total{outcome="refused",reason="unavailable"}'] >= 1

    log = receiver.access_log()
    posts = [line for line in log if line["path"] == "/v1/checkpoints"]
    assert {line["status"] for line in posts} >= {202, 401, 413, 422, 503}
    raw = receiver.log.read_text()
    for secret_bit in (SECRET_OLD, SECRET_NEW, "MfKQ9r8G", '"checkpoint"', "s3://ckpts"):
        assert secret_bit not in raw  # no secrets and no bodies in the log


def test_cli_refuses_to_start_without_a_secret(tmp_path: Path) -> None:
    env = _env("http://127.0.0.1:9/api", tmp_path)
    env.pop("MICROSCOPE_WEBHOOK_SECRET")
    p = subprocess.run(
        [str(VENV_BIN / "microscope"), "webhook", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        "microscope: error: MICROSCOPE_WEBHOOK_SECRET is not set; create one with `microscope webhook secret`"
    )
    s = subprocess.run([str(VENV_BIN / "microscope"), "webhook", "secret"], capture_output=True, text=True, timeout=60)
    secret = s.stdout.strip()
    from standardwebhooks.webhooks import Webhook

    assert secret.startswith("whsec_") and Webhook(secret)  # a valid secret for the library
    for empty in ("whsec_", "whsec_not base64!"):  # issue 21 #10: never a healthy receiver that refuses everything
        env["MICROSCOPE_WEBHOOK_SECRET"] = f"{secret} {empty}"
        p = subprocess.run(
            [str(VENV_BIN / "microscope"), "webhook", "serve", "--port", str(free_port())],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
            "microscope: error: MICROSCOPE_WEBHOOK_SECRET holds a secret that is empty or not base64 after "
            "'whsec_'; create one with `microscope webhook secret`"
        ), p.stderr[-1000:]


def test_notify_cli(receiver: Receiver, prefect: httpx.Client, tmp_path: Path) -> None:
    """`microscope notify` for any other trainer: signed, retried, idempotent; one line when it gives up."""
    env = _env("http://127.0.0.1:9/api", tmp_path, MICROSCOPE_WEBHOOK_URL=f"{receiver.url}/v1/checkpoints")
    args = [str(VENV_BIN / "microscope"), "notify", "--checkpoint", "s3://ckpts/cli/step-5", "--run-id", "cli"]
    args += ["--step", "5", "--tag", "source=cli", "--stages", "ingest,trace"]
    first = subprocess.run([*args, "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    accepted = json.loads(first.stdout)
    assert accepted["duplicate"] is False
    fr = prefect.get(f"/flow_runs/{accepted['flow_run_id']}").json()
    assert fr["parameters"]["tags"] == {"source": "cli"} and fr["parameters"]["stages"] == ["ingest", "trace"]
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == f"already started: flow run {accepted['flow_run_id']}"

    dead = subprocess.run(
        [*args, "--url", "http://127.0.0.1:9/v1/checkpoints", "--timeout", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dead.returncode == 1
    assert dead.stderr.strip().splitlines()[-1].startswith("microscope: error: ")
    bad = subprocess.run([*args[:-2], "--step", "-3"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--step" in bad.stderr.strip().splitlines()[-1]


def test_oversized_bodies_always_get_the_413(tmp_path: Path) -> None:
    """Every oversized delivery (2 and 8 MiB; Content-Length or chunked; keep-alive or `Connection: close`)
    reads a 413 with the JSON detail: the receiver drains the body first, so the sender never sees a reset
    (which it would retry as a network error) and a kept-alive connection serves the next request."""
    from schemas.webhook import MAX_BODY_BYTES

    proc, rec = start_receiver("http://127.0.0.1:9/api", tmp_path)  # a 413 needs no Prefect
    port = int(rec.url.rsplit(":", 1)[1])
    expected = {"detail": f"body over {MAX_BODY_BYTES} bytes"}
    try:
        cases = [(s, ch, cl) for s in (2 << 20, 8 << 20) for ch in (False, True) for cl in (False, True)] * 3
        for size, chunked, close in cases:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            headers = {"content-type": "application/json"} | ({"connection": "close"} if close else {})
            if not chunked:
                headers["content-length"] = str(size)
            body = (b"x" * 2**16 for _ in range(size // 2**16))  # no length given: http.client sends it chunked
            try:
                conn.request("POST", "/v1/checkpoints", body=body, headers=headers)
                r = conn.getresponse()
                case = (size, chunked, close)
                assert r.status == 413, case
                assert json.loads(r.read()) == expected, case
                if not close:  # the body was read to its end: the connection is ready for the next request
                    conn.request("GET", "/healthz")
                    assert conn.getresponse().status == 200, case
            finally:
                conn.close()

        # Declared beyond what is worth reading: the 413 comes at once, and the connection ends.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v1/checkpoints HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (1 << 30))
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, text = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower()
        assert json.loads(text) == expected
        assert sum(line["status"] == 413 for line in rec.access_log()) == len(cases) + 1
    finally:
        proc.terminate()
        proc.wait(20)


class CallbackSink:
    """A training job's callback_url on 127.0.0.1: keeps (Host header, headers, body) of every POST."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, dict[str, str], str]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                sink.requests.append((self.headers["host"], dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_result_callbacks_are_checked_where_they_are_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21 #9: a callback_url that reaches the audit another way (`microscope run --callback-url`) is checked
    when the result is POSTed, and the POST goes to the address that was checked (pinned against DNS rebinding)
    with the URL's name kept in the Host header."""
    from standardwebhooks.webhooks import Webhook

    from microscope.result_callback import CallbackTarget, pin, post_result

    sink = CallbackSink()
    url = f"http://127.0.0.1:{sink.port}/results"
    monkeypatch.delenv("MICROSCOPE_CALLBACK_ALLOW_PRIVATE", raising=False)
    try:
        why = post_result(url, {"status": "completed"}, SECRET_OLD, give_up_after_s=5)
        assert why == (
            f"{url} refused: host 127.0.0.1 is a loopback address; results go to public addresses only, unless "
            "MICROSCOPE_CALLBACK_ALLOW_PRIVATE=true on the receiver and the audits"
        )
        assert sink.requests == []  # refused before connecting, and not retried
        monkeypatch.setenv("MICROSCOPE_CALLBACK_ALLOW_PRIVATE", "true")
        assert post_result(url, {"status": "completed"}, SECRET_OLD, give_up_after_s=5) is None
        (_, headers, body), *_ = sink.requests
        assert Webhook(SECRET_OLD).verify(body, headers) == {"status": "completed"}

        target = pin(f"http://results.example:{sink.port}/results?run=7", "127.0.0.1")
        assert target == CallbackTarget(f"{url}?run=7", {"host": f"results.example:{sink.port}"})
        assert httpx.post(target.url, content=b"{}", headers=target.headers).status_code == 204
        assert sink.requests[-1][0] == f"results.example:{sink.port}"  # connected to the address, named by the URL
        assert pin("https://u:p@results.example/r", "2606:4700::1") == CallbackTarget(
            "https://u:p@[2606:4700::1]/r", {"host": "results.example"}, {"sni_hostname": "results.example"}
        )  # TLS checks the certificate against the name
    finally:
        sink.server.shutdown()


def test_a_laptop_stack_takes_local_checkpoints_and_callbacks_on_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """`microscope up` on 127.0.0.1: its trainer writes checkpoints to this disk and listens here; elsewhere, and
    where the environment says otherwise, the receiver's strict defaults hold."""
    from flows.local_stack import laptop_webhook_settings

    for name in ("MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS", "MICROSCOPE_CALLBACK_ALLOW_PRIVATE"):
        monkeypatch.delenv(name, raising=False)
    local = {"MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS": "s3:// /", "MICROSCOPE_CALLBACK_ALLOW_PRIVATE": "true"}
    assert laptop_webhook_settings("127.0.0.1") == laptop_webhook_settings("localhost") == local
    assert laptop_webhook_settings("0.0.0.0") == laptop_webhook_settings("10.1.2.3") == {}
    monkeypatch.setenv("MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS", "/data/ckpts/")
    monkeypatch.setenv("MICROSCOPE_CALLBACK_ALLOW_PRIVATE", "false")
    assert laptop_webhook_settings("127.0.0.1") == {}
