"""The battery's store cases (S1–S12 of the hostile-inputs report, issue 21): a killed audit takes its
temporary Prefect server with it; a full disk is one line, final (not retried), cleaned up, and the record
is kept; a read-only store is refused before anything runs and can still be read; an unreadable record
breaks neither `list` nor `show` for the others. Full and read-only disks are real: tmpfs mounts (we run
as root; where mounting is not allowed the cases are skipped, saying so)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.cli import main
from microscope.errors import is_retryable
from tests.conftest import VENV_BIN, cli_env
from tests.hostile.common import EXIT_FAILED, EXIT_INPUT, microscope, refused

BIG_TRACE = """
dataset: {seq_len: 32, max_tokens: 4096}
trace: {layers: all, hooks: [resid, mlp, attn], batch_size: 8, part_tokens: 256}
"""


def _mount(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()}): full and read-only disks need one")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system: ingest's tokens fit, the trace's activations do not."""
    where = tmp_path / "disk"
    _mount(where, "size=1m")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_errors_are_final() -> None:
    for code in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        assert not is_retryable(OSError(code, os.strerror(code)))
    assert not is_retryable(OSError("[Errno 28] Error writing bytes to file"))  # pyarrow's, errno in text only
    assert is_retryable(OSError(errno.EIO, "I/O error")) and is_retryable(ConnectionResetError())


def test_s2_s3_a_full_store_fails_in_one_line_keeps_the_record_and_resumes(
    disk: Path, prefect_api: str, tiny_gpt2_dir: Path, corpus_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "audit.yaml").write_text(BIG_TRACE)
    env = cli_env(tmp_path, prefect_api, MICROSCOPE_STORE=str(disk / "store"))
    args = ["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file), "--config", "audit.yaml"]
    p = microscope([*args, "--stages", "ingest,trace", "--audit-id", "full1"], env, tmp_path)
    refused(p, EXIT_FAILED, "trace: the disk is full (", "; free space there or point --store at another disk")
    left = [f for f in (disk / "store").rglob("*") if ".tmp-" in f.name]
    assert not left, left  # the half-written parts went with the failure: the space is free again
    shown = json.loads(microscope(["show", "full1", "--json"], env, tmp_path).stdout)  # S2: the record is kept
    assert shown["stages"]["ingest"]["status"] == "completed" and shown["stages"]["trace"]["status"] == "failed"
    assert "traceback" not in shown["stages"]["trace"]["error"]  # no log written to a full disk
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # S3: room again
    again = microscope([*args, "--stages", "ingest,trace", "--audit-id", "full2", "--json"], env, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    rec = json.loads(again.stdout)
    assert rec["stages"]["ingest"]["status"] == "cached" and rec["stages"]["trace"]["status"] == "completed"


def test_s8_s9_s10_a_read_only_store_is_refused_before_anything_runs_and_still_read(
    tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from microscope import audits
    from microscope.store import open_store
    from schemas.records import AuditRecord

    ro = tmp_path / "ro"
    _mount(ro, "size=4m")
    try:
        store = open_store(str(ro))
        rec = {"audit_id": "kept", "created_at": "2026-12-06T00:00:00Z", "status": "completed",
               "model": {"source": "m", "source_fingerprint": "0"}, "config": {}, "store_uri": store.uri}  # fmt: skip
        audits.save(store, AuditRecord.model_validate(rec))
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        env = cli_env(tmp_path, None, MICROSCOPE_STORE=str(ro))
        p = microscope(["run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file)], env, tmp_path)
        refused(p, EXIT_INPUT, f"store {ro} is not writable: the file system is read-only", "point --store")
        assert "temporary server" not in p.stderr  # S8/S9: nothing ran
        assert main(["--store", str(ro), "show", "kept", "--json"]) == 0  # S10: reading still works
        assert json.loads(capsys.readouterr().out)["audit_id"] == "kept"
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_s6_s7_an_unreadable_record_breaks_neither_list_nor_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from microscope import audits
    from microscope.store import open_store
    from schemas.records import AuditRecord

    store = open_store(str(tmp_path / "store"))
    for aid in ("good", "broken"):
        rec = {"audit_id": aid, "created_at": "2026-12-06T00:00:00Z", "status": "completed",
               "model": {"source": "m", "source_fingerprint": "0"}, "config": {}, "store_uri": store.uri}  # fmt: skip
        audits.save(store, AuditRecord.model_validate(rec))
    key = "audits/broken.json"
    store.put_bytes(key, store.get_bytes(key)[:40])
    assert main(["--store", store.uri, "list"]) == 0
    out = capsys.readouterr()
    assert "good" in out.out and "skipped audits/broken.json" in out.err
    assert main(["--store", store.uri, "show", "broken"]) == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"audit record {store.uri}/{key} is unreadable (" in err, err
    assert err.endswith("restore it from a backup or delete it")


def _server_of(pid: int, timeout: float = 120) -> int:
    """The pid of the temporary Prefect server that process `pid` started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"prefect.server.api.server:create_app" in cmdline:
                return int(child)
        time.sleep(0.2)
    raise AssertionError("no temporary server was started")


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":  # exited, waiting for its (new) parent to reap it
            return True
        time.sleep(0.2)
    return False


def test_s1_a_killed_audit_takes_its_temporary_server_with_it(
    tmp_path: Path, tiny_gpt2_dir: Path, corpus_file: Path
) -> None:
    """kill -9 of the command alone (an OOM kill, a CI timeout): no exit hook runs, yet its server stops."""
    env = {k: v for k, v in cli_env(tmp_path, None).items() if k != "MICROSCOPE_WARM_SOCKET"}
    args = [str(VENV_BIN / "microscope"), "run", "--model", str(tiny_gpt2_dir), "--dataset", str(corpus_file)]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = _server_of(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert _gone(server, 15), f"temporary server {server} outlived its killed audit"
    finally:
        if proc.poll() is None:
            proc.kill()
