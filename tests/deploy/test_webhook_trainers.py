"""Training jobs → receiver → Prefect → worker → audit → signed result: a real Lightning fit and a real
HF `Trainer` with Microscope's callbacks, against `microscope webhook serve` in front of a real Prefect
server with the deployments registered (`make deploy`), and a real `prefect worker` that runs the audits.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, VENV_BIN, prefect_server, stop
from tests.deploy.test_webhook import SECRET_NEW, SECRET_OLD, _env, deploy, start_receiver
from tests.toy_models import tiny_lightning_module

pytestmark = pytest.mark.scenario


class ResultSink:
    """The training job's callback_url: keeps every signed result, refuses unsigned ones."""

    def __init__(self) -> None:
        from standardwebhooks.webhooks import Webhook

        self.results: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
                try:
                    sink.results.append(Webhook(SECRET_OLD).verify(body, dict(self.headers)))
                    self.send_response(204)
                except Exception:  # noqa: BLE001 -- any verification failure is a 401
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/results"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("trainers")
    # The trainers write checkpoints (and the tests their datasets) under pytest's folder, and the result sink
    # listens on 127.0.0.1: allowed explicitly, as on a laptop.
    local = {
        "MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS": f"s3:// {tmp_path_factory.getbasetemp()}",
        "MICROSCOPE_CALLBACK_ALLOW_PRIVATE": "true",
    }
    with prefect_server(home) as api:
        deploy(api, home)
        proc, receiver = start_receiver(api, home, **local)
        try:
            yield {
                "api": httpx.Client(base_url=api, timeout=30),
                "api_url": api,
                "receiver": receiver,
                "home": home,
                "local": local,
            }
        finally:
            proc.terminate()
            proc.wait(20)


def runs_of(api: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    body = {"flow_runs": {"tags": {"all_": ["webhook"]}}, "limit": 200}
    return sorted(
        (fr for fr in api.post("/flow_runs/filter", json=body).json() if fr["parameters"].get("run_id") == run_id),
        key=lambda fr: fr["parameters"]["step"],
    )


def test_lightning_fit_starts_one_audit_per_checkpoint(stack: dict[str, Any], tmp_path: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from microscope.integrations import MicroscopeCallback

    torch.manual_seed(0)
    cb = MicroscopeCallback(
        url=f"{stack['receiver'].url}/v1/checkpoints", secret=SECRET_NEW, run_id="lit-run", export="safetensors"
    )
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2, save_top_k=-1), cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path,
    )
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer.fit(tiny_lightning_module(), DataLoader(data, batch_size=4))
    cb.notifier.close(timeout_s=30)
    runs = runs_of(stack["api"], "lit-run")
    assert [fr["parameters"]["step"] for fr in runs] == [2, 4, 6]  # one flow run per checkpoint
    for fr in runs:
        model = Path(fr["parameters"]["model"])
        assert model.suffix == ".safetensors" and model.exists()
        stack["api"].post(f"/flow_runs/{fr['id']}/set_state", json={"state": {"type": "CANCELLED"}, "force": True})


def test_hf_trainer_checkpoints_are_audited_and_the_result_called_back(
    stack: dict[str, Any], tmp_path: Path, bpe_tokenizer_dir: Path, corpus_file: Path
) -> None:
    import torch
    import transformers

    from microscope.integrations import MicroscopeTrainerCallback

    vocab = len(transformers.AutoTokenizer.from_pretrained(bpe_tokenizer_dir))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64)
    ids = torch.randint(0, vocab, (16, 16), generator=torch.Generator().manual_seed(0))
    sink = ResultSink()
    cb = MicroscopeTrainerCallback(
        url=f"{stack['receiver'].url}/v1/checkpoints",
        secret=SECRET_OLD,
        run_id="hf-run",
        dataset=str(corpus_file),
        config={"model": {"tokenizer": str(bpe_tokenizer_dir)}, "dataset": {"seq_len": 32, "max_tokens": 512}},
        stages=["ingest"],
        tags={"trainer": "hf"},
        callback_url=sink.url,
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    data = [{"input_ids": row, "labels": row} for row in ids]
    transformers.Trainer(model=transformers.GPT2LMHeadModel(cfg), args=args, train_dataset=data, callbacks=[cb]).train()
    cb.notifier.close(timeout_s=30)
    runs = runs_of(stack["api"], "hf-run")
    assert [fr["parameters"]["step"] for fr in runs] == [2, 4]
    assert runs[0]["parameters"]["model"] == str(tmp_path / "out" / "checkpoint-2")

    # a real worker runs them (each stage in the audit's own process here; see test_deployments_e2e for pods)
    env = _env(stack["api_url"], stack["home"], MICROSCOPE_EXECUTION="local", PREFECT_WORKER_QUERY_SECONDS="1")
    env |= stack["local"]  # the audits POST their results to the sink on 127.0.0.1
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "microscope-gpu", "--type", "process"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

    def states() -> dict[int, dict[str, Any]]:
        return {fr["parameters"]["step"]: stack["api"].get(f"/flow_runs/{fr['id']}").json() for fr in runs}

    try:  # the result is POSTed just before the flow run ends: wait for both
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (
            len(sink.results) < 2 or any(s["state"]["type"] not in final for s in states().values())
        ):
            time.sleep(1)
    finally:
        stop(worker)
        log.close()
    assert len(sink.results) == 2, (tmp_path / "worker.log").read_text()[-3000:]
    finished = states()
    for result in sorted(sink.results, key=lambda r: r["step"]):
        fr = finished[result["step"]]
        assert fr["state"]["type"] == "COMPLETED"
        assert result["event"] == "microscope.audit.finished" and result["status"] == "completed"
        assert result["audit_id"] == fr["name"] and result["flow_run_id"] == fr["id"]
        assert result["run_id"] == "hf-run" and result["checkpoint"].endswith(f"checkpoint-{result['step']}")
        assert "ingest" in result["figures"] or result["figures"] == {}
    # and the receiver answers the status query with the finished audit
    from standardwebhooks.webhooks import Webhook

    now = datetime.now(UTC)
    headers = {
        "webhook-id": "status-1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(SECRET_OLD).sign("status-1", now, ""),
    }
    status = stack["receiver"].http.get(f"/v1/checkpoints/{runs[1]['id']}", headers=headers).json()
    assert status["state"] == "COMPLETED" and status["status"] == "completed", json.dumps(status)[:500]
