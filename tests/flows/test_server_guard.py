"""The temporary server's guard, run as the script it is, on stand-in processes: fast and deterministic.

The end-to-end case (a real audit killed with SIGKILL) is tests/hostile/test_store_cases.py::test_s1; these
cover the window that one hits only by chance: the command dying between starting the server and handing
its pid to the guard.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import flows.server_guard as guard_module

GUARD = Path(guard_module.__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fake_server(port: int) -> subprocess.Popen[bytes]:
    """A process whose command line looks like Prefect's temporary server on `port`."""
    code = "import time; time.sleep(120)"
    return subprocess.Popen([sys.executable, "-c", code, "prefect.server.api.server:create_app", "--port", str(port)])


def _ended(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _start_guard(parent: int, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-S", str(GUARD), str(parent), str(port)], stdin=subprocess.PIPE)


def test_a_command_killed_before_handing_over_the_pid_still_takes_its_server() -> None:
    port = _free_port()
    command = subprocess.Popen(["sleep", "120"])
    guard = _start_guard(command.pid, port)
    decoy = _fake_server(_free_port())  # another server, on another port: left alone
    server = _fake_server(port)
    try:
        time.sleep(0.3)  # both stand-ins exec'd
        command.kill()
        command.wait()
        assert _ended(server, 15), "the server outlived its command"
        assert server.returncode == -signal.SIGTERM
        assert _ended(guard, 5) and guard.returncode == 0
        assert decoy.poll() is None, "a server on another port was stopped"
    finally:
        for proc in (command, guard, server, decoy):
            proc.kill()
            proc.wait()


def test_the_guard_stops_the_server_whose_pid_it_was_given_and_ends_with_a_normal_stop() -> None:
    port = _free_port()
    command = subprocess.Popen(["sleep", "120"])
    killed, stopped = _fake_server(port), _fake_server(_free_port())
    guards = [_start_guard(command.pid, port), _start_guard(os.getpid(), _free_port())]
    try:
        for guard, server in zip(guards, (killed, stopped), strict=True):
            assert guard.stdin is not None
            guard.stdin.write(str(server.pid).encode())
            guard.stdin.close()
        stopped.terminate()  # the normal stop at exit: its guard ends, and this test process lives on
        assert _ended(guards[1], 5) and guards[1].returncode == 0
        command.kill()
        command.wait()
        assert _ended(killed, 15) and killed.returncode == -signal.SIGTERM
        assert _ended(guards[0], 5)
    finally:
        for proc in (command, killed, stopped, *guards):
            proc.kill()
            proc.wait()
