"""Stage locks: mutual exclusion across threads and processes, freed by a dead holder, on files and Redis."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from microscope.errors import TransientError
from microscope.locks import REDIS_PREFIX, LockTimeout, lock_path, stage_lock
from tests.conftest import REDIS_LOCKS

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = REDIS_LOCKS


def unique(stage: str = "trace") -> str:
    return f"{uuid.uuid4().hex[:8]}/{stage}/{uuid.uuid4().hex}"


def contend(make_lock: Callable[[], AbstractContextManager[None]], threads: int = 4, rounds: int = 3) -> int:
    """Threads take the lock `rounds` times each; returns how many bodies ran, failing on any overlap."""
    inside, ran, overlaps, errors = [0], [0], [], []
    guard = threading.Lock()  # only protects the counters; exclusion is the stage lock's job

    def work() -> None:
        try:
            for _ in range(rounds):
                with make_lock():
                    with guard:
                        inside[0] += 1
                        if inside[0] != 1:
                            overlaps.append(inside[0])
                    time.sleep(0.01)  # widen the window an overlap would need
                    with guard:
                        inside[0] -= 1
                        ran[0] += 1
        except Exception as e:  # noqa: BLE001 -- reported below, threads don't propagate
            errors.append(e)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=30)
    assert not errors, errors
    assert not overlaps, f"critical sections overlapped: {overlaps}"
    return ran[0]


# ---- file locks -------------------------------------------------------------------------------------


def test_lock_path_is_readable_and_unique(tmp_path: Path) -> None:
    a, b = lock_path("abcd/trace/9f8e", tmp_path), lock_path("abcd_trace_9f8e", tmp_path)
    assert a != b and a.name.startswith("abcd_trace_9f8e-") and a.parent == tmp_path
    assert lock_path("../..", tmp_path).parent == tmp_path  # no escaping the lock folder


def test_file_lock_threads_exclude_each_other(tmp_path: Path) -> None:
    name = unique()
    assert contend(lambda: stage_lock(name, lock_dir=tmp_path / "locks")) == 12
    assert lock_path(name, tmp_path / "locks").exists()  # created with its parents, left in place


def test_file_lock_timeout_names_lock_and_holder(tmp_path: Path) -> None:
    name, told = unique(), []
    with stage_lock(name, lock_dir=tmp_path):
        # Same thread, own open file description: flock excludes it like any other holder.
        with pytest.raises(LockTimeout, match=name) as err:
            with stage_lock(name, lock_dir=tmp_path, wait_s=0.2, on_wait=told.append):
                pytest.fail("acquired a held lock")
    assert f"pid {os.getpid()}" in str(err.value) and err.value.lock == name
    assert len(told) == 1 and name in told[0] and f"pid {os.getpid()}" in told[0]
    with stage_lock(name, lock_dir=tmp_path, wait_s=0, on_wait=told.append):  # free again, no wait
        pass
    assert len(told) == 1


def test_file_lock_freed_when_holder_is_killed(tmp_path: Path) -> None:
    name = unique()
    holder = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from microscope.locks import stage_lock
        with stage_lock({name!r}, lock_dir=Path({str(tmp_path)!r})):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match=f"pid {proc.pid}"):
            with stage_lock(name, lock_dir=tmp_path, wait_s=0):
                pass
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the flock
        proc.wait(timeout=10)
        acquired = False
        with stage_lock(name, lock_dir=tmp_path, wait_s=2):
            acquired = True
        assert acquired
    finally:
        proc.kill()
        proc.wait()


def test_import_is_cheap() -> None:
    code = "import sys, microscope.locks; bad = {'redis', 'prefect', 'torch'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---- Redis locks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_client() -> Iterator[Any]:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    yield client
    client.close()


@pytest.fixture
def rname(redis_client: Any) -> Iterator[str]:
    name = unique()
    yield name
    redis_client.delete(REDIS_PREFIX + name)


def test_redis_lock_threads_exclude_each_other(rname: str, tmp_path: Path) -> None:
    assert contend(lambda: stage_lock(rname, lock_dir=tmp_path, redis_url=REDIS_URL, lease_s=5)) == 12


def test_redis_lease_is_renewed_while_the_body_runs(rname: str, redis_client: Any, tmp_path: Path) -> None:
    held, done = threading.Event(), threading.Event()

    def long_stage() -> None:
        with stage_lock(rname, lock_dir=tmp_path, redis_url=REDIS_URL, lease_s=1):
            held.set()
            time.sleep(2.5)  # 2.5 leases
        done.set()

    t = threading.Thread(target=long_stage)
    t.start()
    assert held.wait(5)
    time.sleep(1.5)  # past the first lease: only renewal still holds it
    told: list[str] = []
    with pytest.raises(LockTimeout, match=rname):
        with stage_lock(rname, lock_dir=tmp_path, redis_url=REDIS_URL, wait_s=0.5, on_wait=told.append):
            pytest.fail("acquired a lock whose holder is alive")
    assert not done.is_set(), "the holder finished before the contender tried: the test proves nothing"
    assert len(told) == 1 and f"pid {os.getpid()}" in told[0]
    t.join(10)
    assert not redis_client.exists(REDIS_PREFIX + rname)  # released, not expired
    with stage_lock(rname, lock_dir=tmp_path, redis_url=REDIS_URL, wait_s=0):
        pass


def test_redis_dead_holder_blocks_only_until_its_lease_ends(rname: str, redis_client: Any, tmp_path: Path) -> None:
    # A killed pod: it took the lock with a 1 s lease and will never renew or release it.
    dead = redis_client.lock(REDIS_PREFIX + rname, timeout=1)
    assert dead.acquire(blocking=False)
    told: list[str] = []
    start = time.monotonic()
    acquired = False
    with stage_lock(rname, lock_dir=tmp_path, redis_url=REDIS_URL, wait_s=5, on_wait=told.append):
        acquired = True
        waited = time.monotonic() - start
    assert acquired and waited > 0.3  # it did wait on the dead holder's lease
    assert len(told) == 1 and "unknown holder" in told[0]  # a foreign token carries no holder record


def test_redis_lost_lease_is_logged(
    rname: str, redis_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="microscope.locks"):
        with stage_lock(rname, lock_dir=tmp_path, redis_url=REDIS_URL, lease_s=0.3):
            redis_client.delete(REDIS_PREFIX + rname)
            time.sleep(0.25)  # one renewal attempt
    lost = [r for r in caplog.records if "lease lost" in r.getMessage()]
    assert len(lost) == 1 and not [r for r in caplog.records if "ran out" in r.getMessage()]


def test_unreachable_redis_is_a_transient_error(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    with pytest.raises(TransientError, match="cannot reach Redis"):
        with stage_lock(unique(), lock_dir=tmp_path, redis_url="redis://127.0.0.1:1/0", wait_s=0):
            pass
