"""The runner's failure handling, shared by every stage (the SAE stage's joint fits included): a full disk
leaves nothing unfinished behind and says so in one line; any other failure keeps finished parts and
drops half-written files. On a real local store; the failures are raised by the compute function."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from microscope.errors import StorageError
from microscope.stages.runner import StageRun, compute_unfinished, publish, run_stage
from microscope.store import TMP_MARK, open_store
from schemas.records import StageRecord, StageStatus


def _record(prefix: str) -> StageRecord:
    return StageRecord(stage="sae", status=StageStatus.completed, details={"prefix": prefix})


def test_a_full_disk_in_a_joint_fit_keeps_the_published_member_and_drops_the_other(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    first, second = "m/sae/aaa", "m/sae/bbb"

    def fit(todo: list[str]) -> dict[str, StageRecord]:
        store.put_bytes(f"{first}/sae.bin", b"1" * 64)
        publish(store, first, _record(first))  # the first SAE of the fit is saved...
        store.put_bytes(f"{second}/sae.bin", b"2" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")  # ...the second one's features fill the disk

    with pytest.raises(StorageError) as err:
        compute_unfinished(store, "sae-group/x", [first, second], fit)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("the disk is full (") and f"{second})" in msg, msg
    assert store.read_manifest(first) is not None and store.list(first)  # published: kept
    assert store.list(second) == []  # never finished here: its room goes back


def test_any_other_failure_keeps_finished_parts_and_drops_half_written_files(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    prefix = "m/trace/ccc"

    def compute(run: StageRun) -> StageRecord:
        store.put_bytes(run.key("part-0.parquet"), b"p" * 32)  # a finished part: a re-run resumes from it
        (Path(store.local_path(run.key("part-1.parquet"))).parent / f"part-1{TMP_MARK}x").write_bytes(b"half")
        raise RuntimeError("the model crashed")

    with pytest.raises(RuntimeError, match="the model crashed"):
        run_stage(store, "trace", prefix, "ccc", compute)
    assert store.list(prefix) == [f"{prefix}/part-0.parquet"]
    assert not [p for p in (tmp_path / "store" / prefix).iterdir() if TMP_MARK in p.name]
    assert store.read_manifest(prefix) is None
