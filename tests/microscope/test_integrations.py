"""microscope.integrations against a real local receiver: a stdlib HTTP server that verifies every request
with standardwebhooks, records what it got (and whether the checkpoint was on disk at that moment), and
answers as scripted. Real Lightning and transformers Trainers, real moto_server S3."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from microscope.integrations import Notifier, NotifyError, notify_checkpoint, signed_headers
from schemas.webhook import Accepted, CheckpointReady
from tests.conftest import REPO, free_port, make_bucket
from tests.toy_models import tiny_lightning_module

LOGGER = "microscope.notify"


# ---- a real receiver -------------------------------------------------------------------------------


class Receiver:
    """Verifies, records, and answers: `script` (popped in order) first, then `always`, else 202."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.requests: list[dict[str, Any]] = []
        self.script: list[tuple[int, dict[str, str], dict[str, Any]]] = []
        self.always: tuple[int, dict[str, str], dict[str, Any]] | None = None
        self.hold = threading.Event()  # cleared: requests wait here before being answered
        self.hold.set()
        self.arrived = threading.Event()
        self.lock = threading.Lock()
        self.url = ""

    def handle(self, headers: dict[str, str], body: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        try:
            payload = Webhook(self.secret).verify(body, headers)
            verified = True
        except WebhookVerificationError:
            payload, verified = None, False
        rec: dict[str, Any] = {"headers": headers, "body": body, "verified": verified, "payload": payload}
        ckpt = (payload or {}).get("checkpoint", "")
        if ckpt and "://" not in ckpt:  # what was on disk when the message arrived
            rec["existed"] = os.path.exists(ckpt)
            rec["listing"] = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else None
        with self.lock:
            self.requests.append(rec)
            n = len(self.requests)
        self.arrived.set()
        self.hold.wait(10)
        if not verified:
            return 401, {}, {"detail": "bad signature"}
        with self.lock:
            if self.script:
                return self.script.pop(0)
            if self.always is not None:
                return self.always
        return 202, {}, {"flow_run_id": f"fr-{n}", "deployment": "audit/checkpoint", "duplicate": False}

    def payloads(self) -> list[dict[str, Any]]:
        return [r["payload"] for r in self.requests if r["verified"]]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver("whsec_" + base64.b64encode(secrets.token_bytes(24)).decode())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
            status, headers, answer = rec.handle({k.lower(): v for k, v in self.headers.items()}, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            for k, v in {"content-type": "application/json", **headers}.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/v1/checkpoints"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield rec
    rec.hold.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def notifiers() -> Iterator[list[Notifier]]:
    """Notifiers a test makes, closed (briefly) afterwards so none waits at exit."""
    made: list[Notifier] = []
    yield made
    for n in made:
        n.close(timeout_s=2)


def message(**over: Any) -> CheckpointReady:
    return CheckpointReady(**{"checkpoint": "s3://bucket/run-1/step-10", "run_id": "run-1", "step": 10, **over})


# ---- signing and delivery ------------------------------------------------------------------------------


def test_signed_headers_verify_with_standard_webhooks(receiver: Receiver) -> None:
    body = message().model_dump_json()
    headers = signed_headers(receiver.secret, body, msg_id="msg_abc")
    assert set(headers) == {"content-type", "webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-id"] == "msg_abc" and headers["webhook-signature"].startswith("v1,")
    assert Webhook(receiver.secret).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):  # another body
        Webhook(receiver.secret).verify(body.replace("run-1", "run-2"), headers)
    stale = signed_headers(receiver.secret, body, now=time.time() - 600)  # `now` is what is signed and sent
    assert int(stale["webhook-timestamp"]) <= time.time() - 599
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(receiver.secret).verify(body, stale)
    assert signed_headers(receiver.secret, body)["webhook-id"] != signed_headers(receiver.secret, body)["webhook-id"]


def test_missing_url_or_secret_names_the_variable(monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    monkeypatch.delenv("MICROSCOPE_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("MICROSCOPE_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ValueError, match="MICROSCOPE_WEBHOOK_URL"):
        Notifier(secret=receiver.secret)
    with pytest.raises(ValueError, match="MICROSCOPE_WEBHOOK_SECRET"):
        Notifier(url=receiver.url)
    with pytest.raises(ValueError, match="whsec_"):
        Notifier(url=receiver.url, secret="whsec_not base64!")
    monkeypatch.setenv("MICROSCOPE_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("MICROSCOPE_WEBHOOK_SECRET", f"{receiver.secret} whsec_b2xkc2VjcmV0")  # signs with the first
    n = Notifier()
    try:
        assert n.send(message()).flow_run_id == "fr-1"
    finally:
        n.close()
    assert receiver.requests[0]["verified"]


def test_503s_are_retried_with_one_webhook_id_and_fresh_signatures(
    receiver: Receiver, notifiers: list[Notifier]
) -> None:
    receiver.script = [(503, {"retry-after": "0"}, {"detail": "prefect api down"})] * 2
    n = Notifier(receiver.url, receiver.secret, give_up_after_s=30)
    notifiers.append(n)
    accepted = n.submit(message()).result(timeout=30)
    assert accepted == Accepted(flow_run_id="fr-3", deployment="audit/checkpoint", duplicate=False)
    assert len(receiver.requests) == 3
    assert all(r["verified"] for r in receiver.requests)  # each attempt signed afresh, and valid
    assert len({r["headers"]["webhook-id"] for r in receiver.requests}) == 1  # the receiver dedupes on it
    assert len({r["body"] for r in receiver.requests}) == 1


def test_a_4xx_is_given_up_at_once_with_the_receivers_detail(
    receiver: Receiver, notifiers: list[Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    receiver.always = (400, {}, {"detail": [{"loc": ["body", "step"], "msg": "step must be >= 0"}]})
    n = Notifier(receiver.url, receiver.secret, give_up_after_s=30)
    notifiers.append(n)
    future = n.submit(message())  # nothing raised here
    error = future.exception(timeout=10)
    assert isinstance(error, NotifyError) and "400" in str(error) and "step: step must be >= 0" in str(error)
    assert len(receiver.requests) == 1  # not retried
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step must be >= 0" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    with pytest.raises(NotifyError, match=r"HTTP 400 \(not retried\)"):  # the synchronous path raises
        n.send(message())


def test_a_413_is_permanent_and_an_oversized_message_is_never_sent(
    receiver: Receiver, notifiers: list[Notifier]
) -> None:
    """A body the receiver refuses as too large stays too large: one attempt, no retry loop."""
    from schemas.webhook import MAX_BODY_BYTES

    receiver.always = (413, {}, {"detail": f"body over {MAX_BODY_BYTES} bytes"})
    n = Notifier(receiver.url, receiver.secret, give_up_after_s=30)
    notifiers.append(n)
    error = n.submit(message()).exception(timeout=10)
    assert isinstance(error, NotifyError) and "HTTP 413 (not retried): body over" in str(error)
    assert len(receiver.requests) == 1
    with pytest.raises(NotifyError, match="over the receiver's"):  # caught before it is sent at all
        n.send(message(tags={"pad": "x" * MAX_BODY_BYTES}))
    assert len(receiver.requests) == 1


def test_an_unreachable_receiver_is_given_up_after_give_up_after_s(
    receiver: Receiver, notifiers: list[Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    n = Notifier(f"http://127.0.0.1:{free_port()}/v1/checkpoints", receiver.secret, timeout_s=1, give_up_after_s=2)
    notifiers.append(n)
    start = time.monotonic()
    future = n.submit(message())
    assert not future.done()  # queued: training goes on
    error = future.exception(timeout=20)
    assert isinstance(error, NotifyError) and "gave up after" in str(error) and "ConnectError" in str(error)
    assert time.monotonic() - start >= 2  # it kept trying until give_up_after_s
    assert any("gave up after" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_full_queue_fails_the_future_without_blocking(
    receiver: Receiver, notifiers: list[Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    n = Notifier(receiver.url, receiver.secret, max_pending=1)
    notifiers.append(n)
    receiver.hold.clear()  # the receiver sits on the first request
    first = n.submit(message(step=1))
    assert receiver.arrived.wait(10)  # in flight: the queue is empty again
    second = n.submit(message(step=2))  # queued
    third = n.submit(message(step=3))  # no room
    assert third.done() and isinstance(third.exception(), NotifyError)
    assert "pending" in str(third.exception())
    assert any("step 3" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    receiver.hold.set()
    assert first.result(timeout=10).flow_run_id == "fr-1"
    assert second.result(timeout=10).flow_run_id == "fr-2"
    assert [p["step"] for p in receiver.payloads()] == [1, 2]


def test_close_waits_a_bounded_time_and_fails_what_is_left(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    receiver.always = (503, {"retry-after": "60"}, {"detail": "down"})
    n = Notifier(receiver.url, receiver.secret, give_up_after_s=600)
    futures = [n.submit(message(step=s)) for s in (1, 2)]
    assert receiver.arrived.wait(10)
    n.close(timeout_s=0.5)  # returns although the receiver asks for a minute
    for f in futures:
        assert isinstance(f.exception(timeout=10), NotifyError)
    assert any("undelivered" in r.getMessage() for r in caplog.records)
    assert isinstance(n.submit(message()).exception(timeout=1), NotifyError)  # closed: refused, not raised


def test_importing_the_package_loads_no_training_framework() -> None:
    code = (
        "import sys, microscope.integrations as m; "
        "print(sorted(k for k in ('torch', 'lightning', 'transformers', 'boto3', 'prefect') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---- S3 upload -----------------------------------------------------------------------------------------


def test_upload_to_s3_then_notify_with_the_uri(receiver: Receiver, s3_env: str, tmp_path: Path) -> None:
    import boto3

    make_bucket(s3_env, "ckpts")
    weights = tmp_path / "step-10.safetensors"
    weights.write_bytes(secrets.token_bytes(200_000))
    folder = tmp_path / "checkpoint-20"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "model.safetensors").write_bytes(b"w" * 1000)

    accepted = notify_checkpoint(
        weights, "run-s3", 10, url=receiver.url, secret=receiver.secret, wait=True, upload_to="s3://ckpts/audits"
    )
    assert isinstance(accepted, Accepted)
    future = notify_checkpoint(
        folder, "run-s3", 20, url=receiver.url, secret=receiver.secret, upload_to="s3://ckpts/audits/", tags={"a": "b"}
    )
    assert future.result(timeout=30).flow_run_id == "fr-2"

    first, second = receiver.payloads()
    assert first["checkpoint"] == "s3://ckpts/audits/run-s3/step-10.safetensors" and first["step"] == 10
    assert second["checkpoint"] == "s3://ckpts/audits/run-s3/checkpoint-20" and second["tags"] == {"a": "b"}
    s3 = boto3.client("s3", endpoint_url=s3_env)
    body = s3.get_object(Bucket="ckpts", Key="audits/run-s3/step-10.safetensors")["Body"].read()
    assert body == weights.read_bytes()
    keys = sorted(
        o["Key"] for o in s3.list_objects_v2(Bucket="ckpts", Prefix="audits/run-s3/checkpoint-20/")["Contents"]
    )
    assert keys == ["audits/run-s3/checkpoint-20/config.json", "audits/run-s3/checkpoint-20/sub/model.safetensors"]


# ---- Lightning -----------------------------------------------------------------------------------------


def _fit_lightning(
    tmp_path: Path, callback: Any, module: Any = None, max_steps: int = 6, async_io: bool = False
) -> Any:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import AsyncCheckpointIO
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    module = tiny_lightning_module() if module is None else module
    data = (
        module.train_data() if hasattr(module, "train_data") else TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1, save_last=async_io),
            callback,
        ],
        plugins=[AsyncCheckpointIO()] if async_io else None,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    callback.notifier.close(timeout_s=20)  # deliver what is queued
    return module


@pytest.mark.parametrize("async_io", [False, True], ids=["sync", "async-save-last"])
def test_lightning_callback_notifies_each_checkpoint_after_it_is_written(
    receiver: Receiver, tmp_path: Path, async_io: bool
) -> None:
    # async: AsyncCheckpointIO returns before the file is written (the notification must wait for it), and
    # save_last=True writes last.ckpt at the same steps (notified once, as the step's own file).
    from microscope.integrations import MicroscopeCallback

    cb = MicroscopeCallback(url=receiver.url, secret=receiver.secret, dataset="s3://d/eval.txt", tags={"t": "1"})
    _fit_lightning(tmp_path, cb, async_io=async_io)
    assert len(receiver.requests) == 3 and all(r["verified"] for r in receiver.requests)
    payloads = receiver.payloads()
    assert [p["step"] for p in payloads] == [2, 4, 6]
    assert all(r["existed"] for r in receiver.requests)  # on disk when the message arrived
    assert all(p["checkpoint"].endswith(f"step={p['step']}.ckpt") for p in payloads)
    assert {p["run_id"] for p in payloads} == {"ckpts"}  # no logger: the checkpoint folder's name
    assert payloads[0]["dataset"] == "s3://d/eval.txt" and payloads[0]["tags"] == {"t": "1"}


def test_lightning_export_safetensors_sends_the_export(receiver: Receiver, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from microscope.integrations import MicroscopeCallback

    cb = MicroscopeCallback(url=receiver.url, secret=receiver.secret, run_id="run-st", export="safetensors")
    module = _fit_lightning(tmp_path, cb)
    payloads = receiver.payloads()
    assert [p["step"] for p in payloads] == [2, 4, 6] and all(r["existed"] for r in receiver.requests)
    assert all(p["checkpoint"].endswith(f"step={p['step']}.safetensors") for p in payloads)
    assert {p["run_id"] for p in payloads} == {"run-st"}
    last = load_file(payloads[-1]["checkpoint"])  # step 6 is the final state
    expected = module.model.state_dict()
    assert sorted(last) == sorted(expected) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for k, v in expected.items():
        torch.testing.assert_close(last[k], v, rtol=0, atol=0)
    assert not any(p.name.startswith(".") for p in (tmp_path / "ckpts").iterdir())  # no temporary files left


def test_lightning_export_hf_saves_a_loadable_model(receiver: Receiver, tmp_path: Path) -> None:
    import lightning.pytorch as pl
    import torch
    import transformers

    from microscope.integrations import MicroscopeCallback

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
            self.model = transformers.GPT2LMHeadModel(cfg)

        def train_data(self) -> Any:
            ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
            return torch.utils.data.TensorDataset(ids)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    cb = MicroscopeCallback(url=receiver.url, secret=receiver.secret, run_id="run-hf", export="hf")
    module = _fit_lightning(tmp_path, cb, LM(), max_steps=2)
    (payload,) = receiver.payloads()
    assert payload["step"] == 2 and payload["checkpoint"].endswith("step=2.hf")
    assert "config.json" in receiver.requests[0]["listing"]
    loaded = transformers.GPT2LMHeadModel.from_pretrained(payload["checkpoint"])
    for k, v in module.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


# ---- Hugging Face Trainer ------------------------------------------------------------------------------


def test_hf_trainer_callback_notifies_each_checkpoint_folder(receiver: Receiver, tmp_path: Path) -> None:
    import torch
    import transformers

    from microscope.integrations import MicroscopeTrainerCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    cb = MicroscopeTrainerCallback(url=receiver.url, secret=receiver.secret, stages=["ingest", "metrics"])
    transformers.Trainer(model=transformers.GPT2LMHeadModel(cfg), args=args, train_dataset=data, callbacks=[cb]).train()
    cb.notifier.close(timeout_s=20)
    payloads = receiver.payloads()
    assert [p["step"] for p in payloads] == [2, 4]
    assert [p["checkpoint"] for p in payloads] == [str(tmp_path / "out" / f"checkpoint-{s}") for s in (2, 4)]
    assert all(r["existed"] and "config.json" in r["listing"] for r in receiver.requests)
    assert {p["run_id"] for p in payloads} == {"out"} and payloads[0]["stages"] == ["ingest", "metrics"]
