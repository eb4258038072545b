"""The temporary Prefect server dies with the audit that started it.

Without `PREFECT_API_URL`, Prefect starts a uvicorn server as a child process and stops it at exit. A
command killed with SIGKILL (an OOM kill, a CI timeout) never runs that exit hook: the server is
re-parented to PID 1 and keeps its port and ~270 MB for good. A tiny guard process (standard library
only, no imports of ours: it starts in milliseconds) waits on both processes' pidfds and stops the server
when the command is gone. Prefect's "Stopping temporary server" at exit is dropped, so that the error is
what a user reads last.

Run as a script: `python -S server_guard.py PARENT_PID SERVER_PID`.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

GRACE_S = 5.0


def _guard(parent: int, server: int) -> None:
    """Block until the command or the server ends; if the command went first, stop the server."""
    try:
        parent_fd, server_fd = os.pidfd_open(parent), os.pidfd_open(server)
    except ProcessLookupError:  # one of them is already gone
        parent_fd = server_fd = -1
    if parent_fd < 0:
        try:
            os.kill(server, signal.SIGTERM)
        except ProcessLookupError:
            pass
        return
    ready, _, _ = select.select([parent_fd, server_fd], [], [])
    if server_fd in ready:  # the server was stopped normally
        return
    signal.pidfd_send_signal(server_fd, signal.SIGTERM)
    if not select.select([server_fd], [], [], GRACE_S)[0]:
        signal.pidfd_send_signal(server_fd, signal.SIGKILL)


def guard_temporary_server() -> None:
    """Make every temporary server Prefect starts in this process come with a guard, and stop quietly."""
    from prefect.server.api.server import SubprocessASGIServer

    original = SubprocessASGIServer._run_uvicorn_command
    if getattr(original, "guarded", False):
        return

    def run_guarded(self: Any) -> subprocess.Popen[Any]:
        proc = original(self)
        self.microscope_guard = subprocess.Popen(  # kept: it ends with the server
            [sys.executable, "-S", str(Path(__file__)), str(os.getpid()), str(proc.pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the command's group must not stop the guard first
        )
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
