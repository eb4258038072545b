"""Stage locks: two audits of the same checkpoint compute each content-addressed stage once.

The second audit to reach a stage waits on the lock, then finds the first one's finished manifest.

- Local (no Redis URL): `fcntl.flock` on `lock_dir/<name>.lock`. The lock belongs to the open file
  description, so threads of one process exclude each other as well as processes, and the kernel
  drops it when the holder dies (even kill -9): no lease is needed. Lock files are never deleted:
  unlinking a file someone holds would let a newcomer lock a fresh inode beside them.
- Shared (Redis URL): a redis-py `Lock` with a lease (`timeout`), renewed by a daemon thread while
  the body runs, so a long stage keeps it while a dead pod's lease runs out and frees the stage.

Both are non-reentrant: a thread taking a lock it already holds waits on itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microscope.errors import MicroscopeError, TransientError

if TYPE_CHECKING:  # redis is imported lazily: importing this module stays cheap
    import redis
    from redis.lock import Lock

log = logging.getLogger(__name__)

REDIS_PREFIX = "microscope:lock:"
POLL_S = 0.05  # between tries of a busy file lock: one syscall, cheap against a stage
REDIS_POLL_S = 0.1  # between tries of a busy Redis lock: one round trip


class LockTimeout(MicroscopeError, TimeoutError):
    """The lock stayed busy for `wait_s`; the message names the lock and, when known, its holder."""

    def __init__(self, message: str, *, lock: str = "", holder: str | None = None) -> None:
        super().__init__(message)
        self.lock = lock
        self.holder = holder


def stage_lock(
    name: str,
    *,
    lock_dir: Path,
    redis_url: str | None = None,
    lease_s: float = 120.0,
    wait_s: float | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> AbstractContextManager[None]:
    """Hold the lock `name` (a stage key such as `abcd1234/trace/9f8e...`) for the `with` body.

    `lock_dir` holds the file locks (unused with `redis_url`). `lease_s` is how long a dead holder of a
    Redis lock blocks others (a live one renews it every lease_s/3). `wait_s` bounds the wait (None:
    forever, 0: one try) and raises `LockTimeout` past it. `on_wait(message)` is called once when the
    lock is busy at the first try, with a message naming the holder when it is known.
    """
    if wait_s is not None and wait_s < 0:
        raise ValueError(f"wait_s={wait_s} must be >= 0 (or None to wait forever)")
    if redis_url:
        if lease_s <= 0:
            raise ValueError(f"lease_s={lease_s} must be > 0: a Redis lock without a lease outlives a dead holder")
        return _redis_lock(name, redis_url, lease_s, wait_s, on_wait)
    return _file_lock(name, Path(lock_dir), wait_s, on_wait)


def lock_path(name: str, lock_dir: Path) -> Path:
    """Readable file name for `name`, made unique by a digest (sanitising alone maps `a/b` and `a_b` together)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80]
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return Path(lock_dir) / f"{safe}-{digest}.lock" if safe else Path(lock_dir) / f"{digest}.lock"


# ---- holder descriptions -----------------------------------------------------------------------------


def _holder_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _describe(raw: bytes | str | None) -> str | None:
    """'pid 123 on host x since ...' from a holder record; None when there is none or it is not ours."""
    if not raw:
        return None
    try:
        rec = json.loads(raw)
        return f"pid {rec['pid']} on host {rec['host']} since {rec['since']}"
    except (ValueError, TypeError, KeyError):
        return None


def _busy_message(name: str, holder: str | None) -> str:
    return f"waiting for lock {name!r}, held by {holder or 'an unknown holder'}"


def _timeout(name: str, where: str, wait_s: float, holder: str | None) -> LockTimeout:
    return LockTimeout(
        f"lock {name!r} ({where}) still held by {holder or 'an unknown holder'} after waiting {wait_s:g}s; "
        "raise wait_s, or if the holder is gone wait for its lease to end",
        lock=name,
        holder=holder,
    )


# ---- file lock ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(
    name: str, lock_dir: Path, wait_s: float | None, on_wait: Callable[[str], None] | None
) -> Iterator[None]:
    path = lock_path(name, lock_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if wait_s is None else time.monotonic() + wait_s
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if _try_flock(fd):
                # Someone may have unlinked the file between our open and flock (a cleanup against the
                # rules): then we hold a lock nobody else can see, so start over on the file now there.
                if _same_file(fd, path):
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
                continue
            holder = _describe(_read(path))
            if not told and on_wait is not None:
                on_wait(_busy_message(name, holder))
            told = True
            if deadline is not None and time.monotonic() >= deadline:
                raise _timeout(name, str(path), wait_s or 0.0, holder)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # reopened next try, so a replaced file is noticed
        time.sleep(POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic())))
    try:
        # For messages only: mutual exclusion is the flock, never the file's content.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor of the open file description drops the flock


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# ---- Redis lock --------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _redis_client(url: str) -> redis.Redis:
    import redis

    # Timeouts so a network partition fails a renewal instead of hanging the renewal thread forever.
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)


@contextlib.contextmanager
def _redis_lock(
    name: str, url: str, lease_s: float, wait_s: float | None, on_wait: Callable[[str], None] | None
) -> Iterator[None]:
    import redis
    from redis.exceptions import LockNotOwnedError

    client = _redis_client(url)
    key = REDIS_PREFIX + name
    # thread_local=False: the renewal thread must see the token. The Lock object is private to this call.
    lock = client.lock(key, timeout=lease_s, sleep=REDIS_POLL_S, thread_local=False)
    # The token doubles as the holder record, so waiters can say who holds the stage; the uuid keeps it unique.
    token = json.dumps({**_holder_record(), "id": uuid.uuid4().hex})
    start = time.monotonic()
    try:
        got = lock.acquire(blocking=False, token=token)
        if not got:
            holder = _describe(client.get(key))
            if on_wait is not None:
                on_wait(_busy_message(name, holder))
            left = None if wait_s is None else wait_s - (time.monotonic() - start)  # None: wait forever
            got = (left is None or left > 0) and lock.acquire(blocking=True, blocking_timeout=left, token=token)
            if not got:
                raise _timeout(name, f"Redis key {key}", wait_s or 0.0, _describe(client.get(key)) or holder)
    except redis.RedisError as e:
        raise TransientError(f"lock {name!r}: cannot reach Redis for key {key}: {e}") from e

    stop, lost = threading.Event(), threading.Event()
    renewer = threading.Thread(target=_renew, args=(lock, lease_s, stop, lost), name=f"lock-renew {name}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            lock.release()
        except LockNotOwnedError:
            if not lost.is_set():  # else the renewer has already said so
                log.warning(
                    "lock %r: lease of %gs ran out before the stage finished; another audit may have run it too",
                    name,
                    lease_s,
                )
        except redis.RedisError as e:  # the lease frees the stage anyway; don't mask the body's outcome
            log.warning("lock %r: release failed (%s); it frees itself when its %gs lease ends", name, e, lease_s)


def _renew(lock: Lock, lease_s: float, stop: threading.Event, lost: threading.Event) -> None:
    """Reset the lease to lease_s every lease_s/3, so two renewals can fail before the lease runs out."""
    import redis
    from redis.exceptions import LockNotOwnedError

    while not stop.wait(lease_s / 3):
        try:
            lock.extend(lease_s, replace_ttl=True)
        except LockNotOwnedError:
            lost.set()
            log.warning("lock %r: lease lost (expired or taken over); the stage may run twice", lock.name)
            return
        except redis.RedisError as e:  # a blip: keep trying while the lease may still be ours
            log.warning("lock %r: lease renewal failed (%s); retrying", lock.name, e)
