"""The temporary Prefect server dies with the audit that started it.

Without `PREFECT_API_URL`, Prefect starts a uvicorn server as a child process and stops it at exit. A
command killed with SIGKILL (an OOM kill, a CI timeout) never runs that exit hook: the server is
re-parented to PID 1 and keeps its port and ~270 MB for good. A tiny guard process (standard library
only, no imports of ours: it starts in milliseconds) is started *before* the server, knowing the
command's pid and the server's port; it then learns the server's pid on its stdin and waits on both
processes' pidfds. A command killed between starting the server and handing over its pid (a window of a
fork and an exec, which a loaded CI machine does hit) is covered too: the guard finds the server by its
command line (the uvicorn app and the port, which only one process can hold) and stops it. Prefect's
"Stopping temporary server" at exit is dropped, so that the error is what a user reads last.

Run as a script: `python -S server_guard.py PARENT_PID PORT`, the server's pid then on stdin.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GRACE_S = 5.0
ORPHAN_SEARCH_S = 5.0  # a server forked just before the command died may still be exec'ing
SERVER_APP = b"prefect.server.api.server:create_app"


def _stop(server_fd: int) -> None:
    signal.pidfd_send_signal(server_fd, signal.SIGTERM)
    if not select.select([server_fd], [], [], GRACE_S)[0]:
        signal.pidfd_send_signal(server_fd, signal.SIGKILL)


def _servers_on(port: int) -> list[int]:
    """Pids of uvicorn servers of Prefect's app listening on `port` (found by command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        at = args.index(b"--port") + 1 if b"--port" in args else len(args)
        if SERVER_APP in args and args[at : at + 1] == [str(port).encode()]:
            found.append(int(entry.name))
    return found


def _stop_orphans(port: int) -> None:
    """The command died before telling us the server's pid: find the server by its port and stop it."""
    deadline = time.monotonic() + ORPHAN_SEARCH_S
    while time.monotonic() < deadline:
        for pid in _servers_on(port):
            try:
                _stop(os.pidfd_open(pid))
            except ProcessLookupError:
                pass
            return
        time.sleep(0.1)


def _read_pid(parent_fd: int) -> int | None:
    """The server's pid from stdin, or None if the command died (or closed stdin) first."""
    data = b""
    while True:
        ready, _, _ = select.select([parent_fd, sys.stdin.fileno()], [], [])
        if sys.stdin.fileno() not in ready:
            return None
        chunk = os.read(sys.stdin.fileno(), 32)
        if not chunk:
            return int(data) if data.strip() else None
        data += chunk


def _guard(parent: int, port: int) -> None:
    """Block until the command or the server ends; if the command went first, stop the server."""
    try:
        parent_fd = os.pidfd_open(parent)
    except ProcessLookupError:  # the command is already gone
        _stop_orphans(port)
        return
    server = _read_pid(parent_fd)
    if server is None:
        _stop_orphans(port)
        return
    try:
        server_fd = os.pidfd_open(server)
    except ProcessLookupError:  # the server already ended
        return
    ready, _, _ = select.select([parent_fd, server_fd], [], [])
    if server_fd in ready:  # the server was stopped normally
        return
    _stop(server_fd)


def guard_temporary_server() -> None:
    """Make every temporary server Prefect starts in this process come with a guard, and stop quietly."""
    from prefect.server.api.server import SubprocessASGIServer

    original = SubprocessASGIServer._run_uvicorn_command
    if getattr(original, "guarded", False):
        return

    def run_guarded(self: Any) -> subprocess.Popen[Any]:
        guard = subprocess.Popen(  # kept: it ends with the server
            [sys.executable, "-S", str(Path(__file__)), str(os.getpid()), str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the command's group must not stop the guard first
        )
        try:
            proc = original(self)
        except BaseException:
            guard.kill()
            guard.wait()
            raise
        assert guard.stdin is not None
        try:
            with guard.stdin:
                guard.stdin.write(str(proc.pid).encode())
        except BrokenPipeError:  # the guard is gone (killed by hand): the audit goes on unguarded
            pass
        self.microscope_guard = guard
        return proc

    run_guarded.guarded = True  # type: ignore[attr-defined]
    SubprocessASGIServer._run_uvicorn_command = run_guarded  # type: ignore[method-assign]
    _quiet_stop_message()


def _quiet_stop_message() -> None:
    """Prefect stops its temporary server at exit, after flushing its logs (stopping it sooner leaves its log
    and event clients retrying a dead server for a minute), and says so: dropped, so that a command's last
    line is its result or its error."""
    import logging

    class DropStopping(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Stopping temporary server")

    logging.getLogger("prefect").addFilter(DropStopping())  # the logger Prefect's server helper writes to


if __name__ == "__main__":
    _guard(int(sys.argv[1]), int(sys.argv[2]))
