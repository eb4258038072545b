"""The webhook rows of the hostile-input battery (W1–W27 in ../shared/hostile-cases.md), one test per row,
each against a real receiver (`microscope webhook serve`) in front of a real Prefect server: what a careless
or hostile sender gets back, the status and the one line naming the field or the problem.

One receiver serves the module (roots `s3://ckpts/ /data/checkpoints/`, no private callbacks, a 1 s read
deadline) with a deployment of its own on this worker's Prefect server; a second one has no Prefect behind it
(W22). The rows that are CLI runs (W9's notify, W24–W27) start together once the receivers answer, and are read
when their row comes: each is a second or more of imports."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import VENV_BIN, free_port, stop, wait_http
from tests.deploy.test_webhook import SECRET_NEW, Receiver, _env, body_of, sign, spawn_receiver

ROOTS = "s3://ckpts/ /data/checkpoints/"
READ_TIMEOUT_S = 1.0


@dataclass
class Battery:
    rec: Receiver  # roots, no private callbacks, READ_TIMEOUT_S
    down: Receiver  # its Prefect API does not answer
    api: httpx.Client  # the Prefect server's REST API
    busy_port: int  # held open by the module while W26 tries it
    cli: dict[str, subprocess.Popen]  # the CLI rows, running

    def post(self, body: str | bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        """POST to the receiver, signed over `body` unless `headers` are given."""
        if headers is None:
            assert isinstance(body, str)
            headers = sign(body)
        return self.rec.post(body, headers)

    def refused(self, body: str, status: int, *phrases: str) -> str:
        """POST `body` signed; assert the status and that the detail holds every phrase; returns the detail."""
        r = self.post(body)
        detail = r.json()["detail"]
        assert r.status_code == status, (body[:200], r.status_code, detail)
        assert all(p in detail for p in phrases), (phrases, detail)
        return detail

    def run_cli(self, name: str) -> tuple[int, str]:
        """A CLI row's exit status and last stderr line (its process was started with the module)."""
        _, err = self.cli[name].communicate(timeout=120)
        return self.cli[name].returncode, (err.strip().splitlines() or [""])[-1]

    def runs_of(self, run_id: str) -> list[dict[str, Any]]:
        r = self.api.post("flow_runs/filter", json={"flow_runs": {"tags": {"all_": ["webhook"]}}, "limit": 200})
        assert r.status_code == 200, r.text  # a poisoned row (W9) would make this 500
        return [fr for fr in r.json() if fr["parameters"].get("run_id") == run_id]


def _microscope(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "microscope"), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cli_rows(home: Path, busy_port: int, rec: Receiver, api_url: str) -> dict[str, subprocess.Popen]:
    """The CLI rows, started together."""
    env = _env(api_url, home)
    serve = ["webhook", "serve", "--port"]
    no_secret = {k: v for k, v in env.items() if k != "MICROSCOPE_WEBHOOK_SECRET"}
    no_api = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    notify = ["notify", "--checkpoint", "s3://ckpts/n/1", "--run-id", "n", "--url", f"{rec.url}/v1/checkpoints"]
    wrong = ["--step", "1", "--timeout", "20", "--secret", "whsec_" + "d3Jvbmcgc2VjcmV0IGtleQ=="]
    return {
        "no secret": _microscope([*serve, str(free_port())], no_secret),
        "no api": _microscope([*serve, str(free_port())], no_api),
        "empty secret": _microscope([*serve, str(free_port())], env | {"MICROSCOPE_WEBHOOK_SECRET": "whsec_"}),
        "not a secret": _microscope([*serve, str(free_port())], env | {"MICROSCOPE_WEBHOOK_SECRET": "not-a-secret"}),
        "no roots": _microscope([*serve, str(free_port())], env | {"MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS": ""}),
        "file root": _microscope([*serve, str(free_port())], env | {"MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS": "file:///"}),
        "busy port": _microscope([*serve, str(busy_port)], env),
        "notify huge step": _microscope([*notify, "--step", "99999999999999999999999"], env),
        "notify negative step": _microscope([*notify, "--step", "-1"], env),
        "notify wrong secret": _microscope([*notify, *wrong], env),
    }


def _register(api: httpx.Client) -> tuple[str, str]:
    """A deployment of a flow of this module's own (so its flow runs are nobody else's): (flow id, name)."""
    flow = f"hostile-webhook-{uuid.uuid4().hex[:8]}"
    flow_id = api.post("flows/", json={"name": flow}).json()["id"]
    r = api.post("deployments/", json={"name": "checkpoint", "flow_id": flow_id, "enforce_parameter_schema": False})
    assert r.status_code in (200, 201), r.text
    return flow_id, f"{flow}/checkpoint"


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Battery]:
    home = tmp_path_factory.mktemp("hostile-webhook")
    procs: list[subprocess.Popen] = []
    flow_id = None
    with socket.socket() as busy, httpx.Client(timeout=30) as api:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        try:
            down_proc, down = spawn_receiver("http://127.0.0.1:1/api", home)
            procs.append(down_proc)
            api_url: str = request.getfixturevalue("prefect_api")  # this worker's server, started once
            api.base_url = httpx.URL(api_url + "/")
            flow_id, deployment = _register(api)
            settings = {"MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS": ROOTS, "MICROSCOPE_AUDIT_DEPLOYMENT": deployment}
            settings["MICROSCOPE_WEBHOOK_READ_TIMEOUT_S"] = str(READ_TIMEOUT_S)
            rec_proc, rec = spawn_receiver(api_url, home, **settings)
            procs.append(rec_proc)
            wait_http(f"{down.url}/healthz", 60, down_proc)
            wait_http(f"{rec.url}/healthz", 60, rec_proc)
            cli = _cli_rows(home, busy.getsockname()[1], rec, api_url)  # they run while the first rows do
            procs += cli.values()
            yield Battery(rec, down, api, busy.getsockname()[1], cli)
        finally:
            for p in procs:
                stop(p)
            if flow_id is not None:
                api.delete(f"flows/{flow_id}")  # its deployment and flow runs with it


CASES: dict[str, Callable[[Battery], None]] = {}


def case(case_id: str) -> Callable[[Callable[[Battery], None]], Callable[[Battery], None]]:
    def register(fn: Callable[[Battery], None]) -> Callable[[Battery], None]:
        CASES[case_id] = fn
        return fn

    return register


@case("W1")
def valid_delivery_then_the_same_content_under_a_new_id(b: Battery) -> None:
    body = body_of(run_id="w1", step=1)
    first = b.rec.deliver(body, sign(body))
    assert first.status_code == 202 and first.json()["duplicate"] is False, first.text
    again = b.rec.deliver(body, sign(body, secret=SECRET_NEW))  # a new webhook-id, the rotated secret
    assert again.status_code == 202 and again.json() == {**first.json(), "duplicate": True}
    assert [fr["id"] for fr in b.runs_of("w1")] == [first.json()["flow_run_id"]]


@case("W2")
def bodies_that_are_not_a_json_object(b: Battery) -> None:
    b.refused("{not json", 422, "body: Invalid JSON")
    b.refused("[]", 422, "body: Input should be an object")
    b.refused("null", 422, "body: Input should be an object")


@case("W3")
def ten_thousand_deep_nesting_in_config(b: Battery) -> None:
    head = '{"checkpoint": "s3://ckpts/w3", "run_id": "w3", "step": 1, "config": '
    b.refused(head + "[" * 10_000 + "]" * 10_000 + "}", 422, "body: Invalid JSON: recursion limit exceeded")
    b.refused(head + '{"a": ' * 10_000 + "1" + "}" * 10_001, 422, "body: Invalid JSON: recursion limit exceeded")


@case("W4")
def nul_in_run_id(b: Battery) -> None:
    b.refused(body_of(run_id="run\x00x"), 422, "run_id:", "control characters")


@case("W5")
def nul_in_checkpoint(b: Battery) -> None:
    b.refused(body_of(checkpoint="s3://ckpts/a\x00b"), 422, "checkpoint:", "control characters")


@case("W6")
def unicode_run_id_is_kept_and_nul_in_tags_refused(b: Battery) -> None:
    run_id = "\u05e8\u05d9\u05e6\u05d4-\u202e\U0001f680"  # Hebrew, a right-to-left override, an emoji
    body = body_of(run_id=run_id, step=6)
    r = b.rec.deliver(body, sign(body))
    assert r.status_code == 202 and r.json()["duplicate"] is False, r.text
    assert [fr["parameters"]["run_id"] for fr in b.runs_of(run_id)] == [run_id]
    b.refused(body_of(tags={"k\x00": "v"}), 422, "tags:", "control characters")
    b.refused(body_of(tags={"k": "v\x00"}), 422, "tags:", "control characters")
    b.refused(body_of(config={"gate": {"rules": "a\x00b"}}), 422, "config:", "NUL")


@case("W7")
def lone_surrogate_in_run_id(b: Battery) -> None:
    b.refused('{"checkpoint": "s3://ckpts/w7", "run_id": "\\ud800", "step": 1}', 422, "body: Invalid JSON")


@case("W8")
def negative_and_fractional_steps(b: Battery) -> None:
    b.refused(body_of(step=-1), 422, "step: Input should be greater than or equal to 0")
    b.refused(body_of(step=1.5), 422, "step:")


@case("W9")
def step_beyond_64_bits(b: Battery) -> None:
    b.refused(body_of(step=10**30), 422, "step: Input should be less than or equal to 9223372036854775807")
    b.runs_of("w9")  # Prefect's flow-run listing still answers
    code, last = b.run_cli("notify huge step")
    assert code == 2 and last.startswith("microscope: error: --step:"), last


@case("W10")
def step_as_string_or_bool(b: Battery) -> None:
    b.refused(body_of(step="7"), 422, "step: Input should be a valid integer")
    b.refused(body_of(step=True), 422, "step: Input should be a valid integer")


@case("W11")
def checkpoints_outside_the_roots(b: Battery) -> None:
    b.refused(body_of(checkpoint="file:///etc/passwd"), 422, "checkpoint:", "'file://' is not accepted")
    b.refused(body_of(checkpoint="../../../../etc/passwd"), 422, "checkpoint:", "'..'")
    allowed = "(s3://ckpts/, /data/checkpoints/)"
    for outside in ("/etc/shadow", "/data/checkpoints-old/x", "s3://other/x", "s3://ckpts-evil/x"):
        b.refused(body_of(checkpoint=outside), 422, f"checkpoint: '{outside}' is outside the allowed roots {allowed}")
    b.refused(body_of(checkpoint="ckpts/x"), 422, "checkpoint: 'ckpts/x' is not absolute")
    body = body_of(checkpoint="/data/checkpoints//w11/./step-1", run_id="w11", step=1)  # inside, once normalised
    assert b.rec.deliver(body, sign(body)).status_code == 202


@case("W12")
def callbacks_to_non_public_addresses(b: Battery) -> None:
    kinds = {
        "http://169.254.169.254/latest/meta-data/": "host 169.254.169.254 is a link-local address",
        "http://localhost:9/cb": "host localhost is a loopback address",
        "http://[::1]/cb": "host ::1 is a loopback address",
        "http://10.0.0.5/cb": "host 10.0.0.5 is a private address",
        "http://0.0.0.0/cb": "host 0.0.0.0 is an unspecified address",
        "http://2130706433/cb": "host 2130706433 is a loopback address (127.0.0.1)",  # 127.0.0.1 as one number
    }
    for url, why in kinds.items():
        b.refused(body_of(callback_url=url), 422, f"callback_url: {why}", "MICROSCOPE_CALLBACK_ALLOW_PRIVATE")
    b.refused(body_of(callback_url="javascript:alert(1)"), 422, "callback_url:", "http:// or https://")
    body = body_of(callback_url="https://1.1.1.1/cb", run_id="w12", step=1)  # a public address
    assert b.rec.deliver(body, sign(body)).status_code == 202


@case("W13")
def config_path_unknown_stage_extra_field(b: Battery) -> None:
    b.refused(body_of(config="/etc/passwd"), 422, "config: '/etc/passwd' is outside the allowed roots")
    b.refused(body_of(dataset="/etc/shadow"), 422, "dataset: '/etc/shadow' is outside the allowed roots")
    b.refused(body_of(stages=["rm -rf /"]), 422, "stages:", "unknown stage(s) rm -rf /")
    b.refused(body_of(extra=1), 422, "extra: Extra inputs are not permitted")


@case("W14")
def body_not_utf8(b: Battery) -> None:
    raw = b'{"checkpoint": "s3://ckpts/w14", "run_id": "\xff", "step": 1}'
    r = b.post(raw, sign(raw.decode("latin-1")))
    expected = f"body: not UTF-8 (byte {raw.index(0xFF)}); send the JSON message as UTF-8"
    assert r.status_code == 422 and r.json()["detail"] == expected, r.text


@case("W15")
def replay_with_a_changed_body_and_exact_replay(b: Battery) -> None:
    body = body_of(run_id="w15", step=1)
    headers = sign(body)
    assert b.rec.deliver(body, headers).status_code == 202
    r = b.post(body.replace('"step": 1', '"step": 2'), headers)
    assert r.status_code == 401 and r.json()["detail"] == "webhook signature refused: signature does not match"
    again = b.rec.post_retrying(body, headers)  # the very same request again, inside the timestamp tolerance
    assert again.status_code == 202 and again.json()["duplicate"] is True, again.text


@case("W16")
def timestamps_off_by_more_than_the_tolerance(b: Battery) -> None:
    body = body_of(run_id="w16", step=1)
    now = datetime.now(UTC)
    for off in (timedelta(hours=1), timedelta(minutes=6), -timedelta(hours=1)):
        r = b.post(body, sign(body, at=now + off))
        assert r.status_code == 401 and r.json()["detail"].endswith("timestamp too old or too new"), (off, r.text)
    r = b.post(body, sign(body, at=datetime(9999, 12, 31, tzinfo=UTC)))
    assert r.status_code == 401 and r.json()["detail"].endswith("timestamp too old or too new"), r.text
    r = b.post(body, sign(body) | {"webhook-timestamp": "not-a-number"})
    assert r.status_code == 401 and r.json()["detail"].endswith("webhook-timestamp is not a unix time in whole seconds")
    inside = b.rec.post_retrying(body, sign(body, at=now + timedelta(minutes=4)))  # inside the 5 minutes
    assert inside.status_code == 202, inside.text


@case("W17")
def missing_signature_headers(b: Battery) -> None:
    body = body_of(run_id="w17", step=1)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        headers = {k: v for k, v in sign(body).items() if k != name}
        r = b.post(body, headers)
        assert r.status_code == 401 and r.json()["detail"] == f"webhook signature refused: missing {name} header"
    r = b.post(body, {"content-type": "application/json"})
    all_three = "missing webhook-id, webhook-timestamp, webhook-signature headers"
    assert r.status_code == 401 and r.json()["detail"] == f"webhook signature refused: {all_three}"


@case("W18")
def garbage_signatures_and_a_160_kb_signature_header(b: Battery) -> None:
    body = body_of(run_id="w18", step=1)
    for garbage in ("v1,Z2FyYmFnZQ==", "v1a,Z2FyYmFnZQ==", "garbage"):
        r = b.post(body, sign(body) | {"webhook-signature": garbage})
        assert r.status_code == 401 and r.json()["detail"].endswith("signature does not match"), (garbage, r.text)
    huge = " ".join(["v1,Z2FyYmFnZSBzaWduYXR1cmU="] * 6_000)  # ~160 KB
    head, text = _raw(b.rec, _request(body, sign(body) | {"webhook-signature": huge}))
    assert head.startswith(b"HTTP/1.1 431 ") and b"connection: close" in head.lower(), head
    assert json.loads(text)["detail"].startswith("request line and headers over 16384 bytes"), text


@case("W19")
def bodies_over_one_mib(b: Battery) -> None:
    from schemas.webhook import MAX_BODY_BYTES

    port = int(b.rec.url.rsplit(":", 1)[1])
    for chunked in (False, True):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"content-type": "application/json"} | ({} if chunked else {"content-length": str(2 << 20)})
        conn.request("POST", "/v1/checkpoints", body=(b"x" * 2**16 for _ in range(32)), headers=headers)
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read()) == {"detail": f"body over {MAX_BODY_BYTES} bytes"}, chunked
        conn.close()


@case("W20")
def concurrent_deliveries_make_one_run_per_step(b: Battery) -> None:
    """(The battery sent 200; 20 show the same: 202 or a retryable 503, one run per step, duplicates found.)"""
    bodies = [body_of(run_id="w20", step=step, checkpoint=f"s3://ckpts/w20/{step}") for step in range(20)]
    signed = [(body, sign(body)) for body in bodies]
    for round_ in ("first", "again"):
        with ThreadPoolExecutor(len(signed)) as pool:
            answers = list(pool.map(lambda bh: b.post(*bh), signed))
        for r in answers:
            assert r.status_code in (202, 503), (round_, r.status_code, r.text)
            if r.status_code == 503:
                assert r.headers["retry-after"] == "5" and "retry later" in r.json()["detail"], r.text
        # a conforming sender retries each 503 with the same id
        final = [b.rec.deliver(body, sign(body, msg_id=h["webhook-id"])) for body, h in signed]
        assert all(r.status_code == 202 for r in final), [r.text for r in final if r.status_code != 202]
        if round_ == "again":
            assert all(r.json()["duplicate"] for r in final)
    runs = b.runs_of("w20")
    assert sorted(fr["parameters"]["step"] for fr in runs) == list(range(20))  # one run per step, none twice


@case("W21")
def half_open_connections_are_timed_out(b: Battery) -> None:
    port = int(b.rec.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(20)]
    for s in idle:
        s.sendall(b"POST /v1/checkpoints HTTP/1.1\r\nhost: x\r\nwebhook-id: 1\r\n")  # never finished
    slow_body = socket.create_connection(("127.0.0.1", port), timeout=30)
    slow_body.sendall(b"POST /v1/checkpoints HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
    body = body_of(run_id="w21", step=1)
    assert b.rec.deliver(body, sign(body)).status_code == 202  # served meanwhile
    started = time.monotonic()
    late = f"request headers not received within {READ_TIMEOUT_S:g} s; send them at once"
    for s in idle:
        head, text = _read_all(s)
        assert head.startswith(b"HTTP/1.1 408 ") and json.loads(text)["detail"] == late, head
    head, text = _read_all(slow_body)
    assert head.startswith(b"HTTP/1.1 408 ") and "body not received within" in json.loads(text)["detail"]
    assert time.monotonic() - started < 20  # closed by the receiver, not by the sockets' own timeout


@case("W22")
def prefect_unreachable_is_a_retryable_503(b: Battery) -> None:
    body = body_of(run_id="w22", step=1)
    for _ in range(3):
        r = b.down.post(body, sign(body))
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert r.json()["detail"] == "Prefect API unreachable (ConnectError); retry later, nothing was lost"
    ready = b.down.http.get("/readyz")
    assert ready.status_code == 503 and ready.json() == {"prefect": "unreachable"}


@case("W23")
def traversal_in_the_status_path_and_unsigned_status(b: Battery) -> None:
    r = b.rec.http.get("/v1/checkpoints/..%2F..%2Fetc%2Fpasswd", headers=sign(""))
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = b.rec.http.get(f"/v1/checkpoints/{uuid.uuid4()}")
    assert r.status_code == 401 and r.json()["detail"].startswith("webhook signature refused: missing webhook-id")


@case("W24")
def serve_without_secret_or_prefect_api(b: Battery) -> None:
    assert b.run_cli("no secret") == (
        2,
        "microscope: error: MICROSCOPE_WEBHOOK_SECRET is not set; create one with `microscope webhook secret`",
    )
    assert b.run_cli("no api") == (
        2,
        "microscope: error: PREFECT_API_URL is not set; point it at the Prefect server that runs the audits",
    )


@case("W25")
def serve_with_a_secret_or_roots_that_refuse_everything(b: Battery) -> None:
    for name in ("empty secret", "not a secret"):
        code, last = b.run_cli(name)
        assert code == 2 and "MICROSCOPE_WEBHOOK_SECRET holds a secret that is empty or not base64" in last, last
    code, last = b.run_cli("no roots")
    assert code == 2 and "MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS is empty, so every checkpoint would be refused" in last
    code, last = b.run_cli("file root")
    assert code == 2 and "entry 'file:///' is neither s3://bucket[/prefix] nor an absolute path" in last, last


@case("W26")
def serve_on_a_port_in_use(b: Battery) -> None:
    assert b.run_cli("busy port") == (
        2,
        f"microscope: error: port {b.busy_port} on 127.0.0.1 is in use; pick another with --port",
    )


@case("W27")
def notify_with_a_wrong_secret_or_a_negative_step(b: Battery) -> None:
    code, last = b.run_cli("notify wrong secret")
    assert code == 1 and last == (
        "microscope: error: receiver refused it with HTTP 401 (not retried): "
        "webhook signature refused: signature does not match"
    )
    code, last = b.run_cli("notify negative step")
    assert code == 2 and last.startswith("microscope: error: --step: Input should be greater than or equal to 0")


def _request(body: str, headers: dict[str, str]) -> bytes:
    lines = ["POST /v1/checkpoints HTTP/1.1", "host: x", f"content-length: {len(body.encode())}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def _raw(rec: Receiver, data: bytes) -> tuple[bytes, bytes]:
    """Send `data` on a fresh connection, all of it, and read the answer to the end: (head, body)."""
    with socket.create_connection(("127.0.0.1", int(rec.url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(data)  # a reset here would be the failure W18 reported
        return _read_all(s)


def _read_all(s: socket.socket) -> tuple[bytes, bytes]:
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    s.close()
    head, _, text = answer.partition(b"\r\n\r\n")
    return head, text


@pytest.mark.parametrize("case_id", list(CASES))
def test_hostile_webhook_case(battery: Battery, case_id: str) -> None:
    CASES[case_id](battery)


def test_every_webhook_row_has_its_case() -> None:
    assert list(CASES) == [f"W{i}" for i in range(1, 28)]
