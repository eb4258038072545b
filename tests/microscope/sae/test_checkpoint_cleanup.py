"""The sae stage keeps its Lightning checkpoints in the store only while a fit can resume: a killed fit
resumes from them, and once the SAE is published they are deleted (gigabytes per SAE at 7B scale). The
real stages (ingest → trace → sae) on a tiny GPT-2, on a local folder and on S3 (moto_server)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microscope.sae import io
from microscope.sae.checkpoints import LAST, MEMBERS
from microscope.stages.runner import finished
from microscope.store import ArtifactStore, open_store
from schemas.records import StageRecord, StageStatus
from tests.conftest import REPO, make_bucket

HOOK = "blocks.1.hook_resid_post"


def audit_sae(model_dir: str, corpus: str, store_uri: str, epochs: int = 3) -> tuple[StageRecord, StageRecord]:
    """(ingest record, sae record) of one hook, every stage for real (cached stages come from the store)."""
    from microscope.models import loading
    from microscope.stages import ingest, sae, trace
    from microscope.stages.inputs import StageInputs
    from schemas.config import AuditConfig

    cfg = AuditConfig.model_validate(
        {
            "model": {"source": model_dir},
            "dataset": {"path": corpus, "seq_len": 32, "max_tokens": 4096},
            "trace": {"layers": [1], "hooks": ["resid"], "batch_size": 16},
            "sae": {"hooks": [HOOK], "k": 4, "expansion": 4, "lr": 0.003, "batch_size": 256, "epochs": epochs}
            | {"buffer_tokens": 2048, "checkpoint_every": 10},
        }
    )
    store = open_store(store_uri)
    ref = loading.resolve(cfg.model)
    ing = ingest.run(ref, cfg, store)
    inp = StageInputs(ref, ing, loading.describe(loading.load_model(ref)), cfg, store)
    tr = trace.run(inp)
    return ing, sae.run(inp, tr, HOOK, progress=False)


def checkpoint_keys(store: ArtifactStore, ing: StageRecord) -> list[str]:
    return store.list(f"{ing.details['model_digest'][:16]}/sae-checkpoints")


def deleted(caplog: pytest.LogCaptureFixture) -> int:
    """How many checkpoint files the one sweep that deleted any removed."""
    (line,) = [r.getMessage() for r in caplog.records if "training checkpoint file(s)" in r.getMessage()]
    return int(line.split()[1])


def assert_published_without_checkpoints(store: ArtifactStore, ing: StageRecord, rec: StageRecord) -> None:
    assert rec.status in (StageStatus.completed, StageStatus.cached)
    assert checkpoint_keys(store, ing) == []
    assert not [k for k in store.list("") if k.endswith(".ckpt")]
    assert finished(store, rec.details["prefix"]) is not None  # manifest and checksums intact
    files = [store.local_path(k) for k in store.list(f"{rec.details['prefix']}/sae")]  # downloaded from S3
    assert sorted(f.name for f in files) == ["cfg.json", "sae_weights.safetensors"]
    sae = io.load(files[0].parent)
    assert sae.cfg["metadata"]["hook_name"] == HOOK and sae.cfg["d_sae"] == rec.details["d_sae"]


def test_checkpoints_are_deleted_once_the_sae_is_published_and_leftovers_swept(
    home: Path, tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="microscope.sae")
    uri = str(tmp_path / "store")
    ing, rec = audit_sae(str(tiny_gpt2_dir), str(corpus_file), uri)
    store = open_store(uri)
    assert rec.status == StageStatus.completed and rec.metrics["steps"] > 10  # checkpoints were written
    assert deleted(caplog) >= 2  # last.ckpt and members.json (Lightning may leave more)
    assert_published_without_checkpoints(store, ing, rec)

    # What kills leave: a fit killed after publishing (its SAEs done), one killed mid-fit (an SAE still
    # unpublished: it must stay resumable), and a folder of an older version (unknown members: kept).
    root = f"{ing.details['model_digest'][:16]}/sae-checkpoints"
    prefix = rec.details["prefix"]
    for group, members in {"done": [prefix], "resumable": [prefix, "0" * 16 + "/sae/unpublished"], "old": None}.items():
        store.put_bytes(f"{root}/{group}/{LAST}", b"checkpoint")
        if members is not None:
            store.put_json(f"{root}/{group}/{MEMBERS}", members)
    again = audit_sae(str(tiny_gpt2_dir), str(corpus_file), uri)[1]
    assert again.status == StageStatus.cached
    assert sorted({k.split("/")[2] for k in checkpoint_keys(store, ing)}) == ["old", "resumable"]


def test_a_killed_fit_resumes_from_its_checkpoint_then_deletes_it(
    home: Path, tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    uri, epochs = str(tmp_path / "store"), 4  # ~56 steps: seconds left to kill it after the first checkpoint
    child_code = "import sys; from tests.microscope.sae.test_checkpoint_cleanup import audit_sae as a; "
    code = child_code + f"a(*sys.argv[1:], epochs={epochs})"
    child = subprocess.Popen([sys.executable, "-c", code, str(tiny_gpt2_dir), str(corpus_file), uri], cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not list(Path(uri).glob(f"*/sae-checkpoints/*/{LAST}")):
            assert child.poll() is None and time.monotonic() < deadline, "no checkpoint before the fit ended"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
    store = open_store(uri)
    assert not [k for k in store.list("") if "/sae/" in k and k.endswith("manifest.json")]  # killed mid-fit

    ing, rec = audit_sae(str(tiny_gpt2_dir), str(corpus_file), uri, epochs)
    assert rec.status == StageStatus.completed
    assert 0 < rec.details["resumed_from_step"] < rec.metrics["steps"]
    assert_published_without_checkpoints(store, ing, rec)


def test_checkpoints_on_s3_are_deleted_once_published(
    s3_env: str, home: Path, tiny_gpt2_dir: Path, corpus_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from microscope.settings import get_settings

    caplog.set_level(logging.INFO, logger="microscope.sae")
    make_bucket(s3_env, "sae-ckpts")
    uri = "s3://sae-ckpts/audits"
    ing, rec = audit_sae(str(tiny_gpt2_dir), str(corpus_file), uri)
    store = open_store(uri)
    assert rec.status == StageStatus.completed
    assert_published_without_checkpoints(store, ing, rec)
    assert deleted(caplog) == 2  # last.ckpt (uploaded during the fit) and members.json
    staged = get_settings().staging_dir() / "sae-checkpoints"  # the local copy the uploads came from
    assert not [p for p in staged.rglob("*") if p.is_file()]
