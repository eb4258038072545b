"""Finding checkpoints under a prefix (the watch flow's input) and fetching s3:// checkpoints into the
local cache (what a pod does with `model=s3://...`), against a real S3 API (moto_server)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from microscope.checkpoints import find_checkpoints, step_of
from microscope.errors import InputError
from microscope.models.checkpoint import fetch_s3, locate
from tests.conftest import make_bucket


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("step-4000", 4000),
        ("checkpoint-1200", 1200),
        ("epoch=3-step=4500.ckpt.safetensors", 4500),
        ("model_iter_70.pt", 70),
        ("final", None),
    ],
)
def test_step_of(name: str, step: int | None) -> None:
    assert step_of(name) == step


def _hf_folder(p: Path, weights: bytes) -> None:
    p.mkdir(parents=True)
    (p / "config.json").write_text('{"model_type": "gpt2"}')
    (p / "model.safetensors").write_bytes(weights)


def test_local_prefix_lists_folders_and_weight_files_by_step(tmp_path: Path) -> None:
    _hf_folder(tmp_path / "checkpoint-200", b"b" * 10)
    _hf_folder(tmp_path / "checkpoint-100", b"a" * 10)
    (tmp_path / "step-300.safetensors").write_bytes(b"c" * 10)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "logs").mkdir()  # a folder without config.json is not a checkpoint
    found = find_checkpoints(str(tmp_path))
    assert [(Path(c.uri).name, c.step) for c in found] == [
        ("checkpoint-100", 100),
        ("checkpoint-200", 200),
        ("step-300.safetensors", 300),
    ]
    # the digest is over names and content: same bytes, same digest; one byte changed, another
    again = find_checkpoints(str(tmp_path))
    assert [c.digest for c in again] == [c.digest for c in found]
    (tmp_path / "checkpoint-200" / "model.safetensors").write_bytes(b"B" * 10)
    changed = {Path(c.uri).name: c.digest for c in find_checkpoints(str(tmp_path))}
    assert changed["checkpoint-200"] != found[1].digest and changed["checkpoint-100"] == found[0].digest
    # the digest of a single file is sha256 over (name, sha256(bytes)), reproducible by hand
    h = hashlib.sha256(f"step-300.safetensors\0{hashlib.sha256(b'c' * 10).hexdigest()}\0".encode())
    assert found[2].digest == h.hexdigest()


def test_missing_prefix_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a folder"):
        find_checkpoints(str(tmp_path / "nope"))


def test_s3_prefix_and_fetch(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    monkeypatch.setenv("MICROSCOPE_HOME", str(tmp_path / "home"))
    make_bucket(s3_env, "ckpts-unit")
    s3 = boto3.client("s3", endpoint_url=s3_env)
    files = {"config.json": b'{"model_type": "gpt2"}', "model.safetensors": b"w" * 64, "tok/vocab.json": b"{}"}
    for name, body in files.items():
        s3.put_object(Bucket="ckpts-unit", Key=f"run7/step-40/{name}", Body=body)
        s3.put_object(Bucket="ckpts-unit", Key=f"run7/step-400/{name}", Body=body)
    s3.put_object(Bucket="ckpts-unit", Key="run7/step-4.safetensors", Body=b"x" * 8)
    s3.put_object(Bucket="ckpts-unit", Key="run7/readme.md", Body=b"hi")

    found = find_checkpoints("s3://ckpts-unit/run7/")
    assert [(c.uri, c.step) for c in found] == [
        ("s3://ckpts-unit/run7/step-4.safetensors", 4),
        ("s3://ckpts-unit/run7/step-40", 40),
        ("s3://ckpts-unit/run7/step-400", 400),
    ]
    assert found[1].digest == found[2].digest  # same files, same ETags

    # a folder: every file, in its layout (step-40 is not confused with its sibling step-400)
    local = fetch_s3("s3://ckpts-unit/run7/step-40")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == sorted(files)
    assert all((local / n).read_bytes() == b for n, b in files.items())
    assert locate("s3://ckpts-unit/run7/step-40") == local  # the model path a stage resolves
    single = fetch_s3("s3://ckpts-unit/run7/step-4.safetensors")
    assert single.name == "step-4.safetensors" and single.read_bytes() == b"x" * 8
    with pytest.raises(InputError, match="does not exist"):
        fetch_s3("s3://ckpts-unit/run7/step-5")
    with pytest.raises(InputError, match="names no object"):
        fetch_s3("s3://ckpts-unit")


def test_trainer_state_beside_the_model_is_never_opened(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """An HF Trainer's checkpoint-N folder: optimizer/scheduler/RNG/args pickles sit beside the model.
    They are not the model: never unpickled (even a malicious one), not part of the digest."""
    import shutil

    import torch

    from microscope.models.checkpoint import fingerprint, preflight
    from tests.microscope.test_checkpoint import Evil

    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(tiny_gpt2_dir, ckpt)
    before = fingerprint(ckpt)
    marker = tmp_path / "pwned"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({"payload": Evil(marker)}, ckpt / name)
    preflight(ckpt)  # the model's own safetensors are checked; the trainer's pickles are left alone
    assert not marker.exists()
    assert fingerprint(ckpt) == before
    (ckpt / "pytorch_model.bin").write_bytes((ckpt / "optimizer.pt").read_bytes())  # a model pickle is not skipped
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(InputError, match="pickle"):
        preflight(ckpt)
    assert not marker.exists()
