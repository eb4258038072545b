"""A warm `microscope`: a process that has imported everything an audit needs (Prefect, torch,
transformers, MLflow, the stages) forks a child per `microscope run`, so a cached audit answers in
about a second instead of paying seven seconds of imports first.

    microscope run ──(unix socket: argv, environment, working directory, its stdin/stdout/stderr)──▶
    warm process ──fork──▶ child: the run's own command line, environment and terminal, as if started there

The child is the command the user typed: it writes to the caller's terminal (the descriptors travel over
the socket), exits with the code the caller returns, and reads its settings from the caller's
environment (Prefect's settings and logging are rebuilt after the switch). What cannot be switched after
import (the environment that libraries read once, such as HF_* or OMP_*, the Python and the source code)
is compared first: where it differs, the warm process refuses and the command runs cold, saying why.

`microscope up` starts one for its workspace (the socket is named in home/stack.json); the test suite
starts one per session. The socket is the caller's own (mode 600, peer uid checked): nobody else can run
commands through it. Linux only (fork after imports); elsewhere every command runs cold.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
from pathlib import Path

# environment that libraries read once, at import, and that changes what a command does (where models come
# from, which libraries load, how many threads): a child cannot change it, so caller and warm process must
# agree. Cosmetic ones (progress bars, telemetry) are left out: a child keeps the warm process's.
IMPORT_TIME_ENV = (
    "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "TRANSFORMERS_", "CUDA_", "PYTORCH_", "LD_",
    "OMP_", "MKL_", "OPENBLAS_", "PYTHONPATH", "PYTHONHASHSEED",
)  # fmt: skip
PACKAGES = ("flows", "microscope", "tasks", "schemas", "deployments")
_SET_BY_IMPORTS: dict[str, str] = {}  # what the imports put into the environment (a cold run's imports would too)
_WARM_LOGGING_ENV: dict[str, str] = {}  # PREFECT_LOGGING_* as the warm process configured its logging
_FORKED = False  # set in a child: the libraries' settings are rebuilt from the caller's environment


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds")


def forked() -> bool:
    """True in a warm process's child."""
    return _FORKED


def code_fingerprint() -> str:
    """Newest modification time and count of our source files: a warm process with older code refuses."""
    root = Path(__file__).resolve().parents[1]
    newest, count = 0, 0
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            newest = max(newest, path.stat().st_mtime_ns)
            count += 1
    return f"{newest}:{count}"


def _import_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


def _identity() -> dict[str, object]:
    python = f"{os.path.realpath(sys.executable)} in {sys.prefix}"  # python and python3: the same in one venv
    return {"python": python, "code": code_fingerprint(), "env": _import_env(dict(os.environ))}


def socket_path(home: Path) -> Path:
    """home/warm.sock, or a short name in a private folder of /tmp when home's path is too long for a socket."""
    path = home / "warm.sock"
    if len(str(path)) < 100:
        return path
    import hashlib
    import tempfile

    private = Path(tempfile.gettempdir()) / f"microscope-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    st = private.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:  # someone else's folder: its socket could be theirs
        raise RuntimeError(f"{private} is not a private folder of this user; remove it or set MICROSCOPE_HOME")
    return private / f"{hashlib.sha256(str(home).encode()).hexdigest()[:16]}.sock"


# ---- the caller --------------------------------------------------------------------------------


def run_in_warm_process(argv: list[str]) -> int | None:
    """`microscope argv` in the warm process of `microscope up` (or MICROSCOPE_WARM_SOCKET): its exit code, or
    None where there is none to use here."""
    if not supported() or forked():
        return None
    from flows.local_stack import running_stack
    from microscope.settings import get_settings

    settings = get_settings()
    path = settings.warm_socket or (running_stack(settings.home_dir) or {}).get("warm_socket")
    return run_warm(Path(path), argv) if path else None


def run_warm(path: Path, argv: list[str]) -> int | None:
    """Run `microscope argv` in the warm process at `path`: its exit code, or None where there is none
    (not started, gone) or it refused (then the reason is printed and the caller runs the command itself)."""
    if not supported():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    with sock:
        request = {"argv": argv, "cwd": os.getcwd(), "environ": dict(os.environ), **_identity()}
        body = json.dumps(request).encode()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            socket.send_fds(sock, [struct.pack("!I", len(body)) + body], [0, 1, 2])
        except OSError:
            return None
        reader = sock.makefile("r")
        first = reader.readline().split(" ", 1)
        if first[0] == "refused":
            print(f"microscope: the warm process was not used ({first[1].strip()}); running here", file=sys.stderr)
            return None
        if first[0] != "pid":
            return None
        pid = int(first[1])

        def forward(signum: int, _frame: object) -> None:  # Ctrl-C reaches the child, which keeps what finished
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        saved = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            last = reader.readline().split()
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
        return int(last[1]) if len(last) == 2 and last[0] == "exit" else 1


# ---- the warm process --------------------------------------------------------------------------


# what the libraries import lazily themselves, on every audit (MLflow's store and migrations, Qdrant's local mode)
LIBRARY_INTERNALS = (
    "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.db.utils", "mlflow.artifacts", "alembic.command",
    "qdrant_client.local.qdrant_local",
)  # fmt: skip


def lazy_imports() -> list[str]:
    """Every module our code imports inside a function (so that `--help` stays fast): the warm process
    imports them up front, and a new lazy import is preloaded without anyone listing it."""
    import ast

    root = Path(__file__).resolve().parents[1]
    names: set[str] = set()
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            for fn in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import):
                        names.update(a.name for a in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                        names.add(node.module)
    return sorted(names - {__name__})


def preload() -> None:
    """Import what commands import (and nothing that starts threads: a fork copies only the calling one)."""
    import importlib

    import flows.audit  # noqa: F401 -- Prefect, torch, transformers, MLflow, every stage

    for name in [*lazy_imports(), *LIBRARY_INTERNALS]:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- an optional extra not installed here: its command imports it itself
            pass


def serve(path: Path) -> None:
    """Accept callers on `path` until terminated; one forked child per command."""
    global _WARM_LOGGING_ENV, _SET_BY_IMPORTS
    me = _identity()  # the environment as started: imports add to it (torch sets PYTORCH_NVML_BASED_CUDA_CHECK)
    before = dict(os.environ)
    preload()
    _SET_BY_IMPORTS = {k: v for k, v in os.environ.items() if k not in before}
    _WARM_LOGGING_ENV = {k: v for k, v in os.environ.items() if k.startswith("PREFECT_LOGGING")}
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is born mode 600
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(16)
    children: dict[int, socket.socket] = {}
    print(f"warm process {os.getpid()} ready on {path}", file=sys.stderr, flush=True)
    try:
        while True:
            callers = {c: pid for pid, c in children.items() if c.fileno() >= 0}
            ready, _, _ = select.select([listener, *callers], [], [], 0.2)
            for conn in ready:
                if conn is listener:
                    _accept(listener, me, children)
                elif not conn.recv(1, socket.MSG_PEEK):  # the caller went away: interrupt its command, once
                    _signal(callers[conn], signal.SIGINT)
                    conn.close()
            _reap(children)
    finally:
        path.unlink(missing_ok=True)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
        print(f"command {pid} exited {code}", file=sys.stderr, flush=True)
        if conn is not None:
            with conn:
                try:
                    conn.sendall(f"exit {code}\n".encode())
                except OSError:
                    pass


def _accept(listener: socket.socket, me: dict[str, object], children: dict[int, socket.socket]) -> None:
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid != os.getuid():
            raise PermissionError(f"caller uid {uid} is not this process's")
        conn.settimeout(10)
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        (size,) = struct.unpack("!I", data[:4])
        body = data[4:]
        while len(body) < size:
            more = conn.recv(size - len(body))
            if not more:
                raise ConnectionError("the caller closed the connection mid-request")
            body += more
        request = json.loads(body)
        why = _mismatch(me, request)
        if why or len(fds) != 3:
            why = why or "no terminal descriptors"
            print(f"refused a command: {why}", file=sys.stderr, flush=True)
            conn.sendall(f"refused {why}\n".encode())
            raise ConnectionAbortedError
    except (OSError, ValueError, ConnectionAbortedError):
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        listener.close()
        for other in children.values():
            other.close()
        _child(conn, fds, request)
    for fd in fds:
        os.close(fd)
    print(f"command {pid}: microscope {' '.join(request['argv'])} (in {request['cwd']})", file=sys.stderr, flush=True)
    conn.settimeout(None)
    conn.sendall(f"pid {pid}\n".encode())
    children[pid] = conn


def _mismatch(me: dict[str, object], request: dict[str, object]) -> str:
    if request.get("python") != me["python"]:
        return f"it runs {me['python']}, this command {request.get('python')}"
    if request.get("code") != me["code"]:
        return "the source changed since it started; restart `microscope up`"
    theirs, mine = request.get("env") or {}, me["env"]
    assert isinstance(theirs, dict) and isinstance(mine, dict)
    differ = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    if not differ:
        return ""
    return f"{', '.join(differ[:3])} {'differ' if len(differ) > 1 else 'differs'} from its environment"


def _child(conn: socket.socket, fds: list[int], request: dict) -> None:
    global _FORKED
    code = 1
    try:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({**_SET_BY_IMPORTS, **request["environ"]})
        _FORKED = True
        from flows.cli import main

        sys.argv = ["microscope", *request["argv"]]
        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 -- the traceback goes to the caller's terminal, as a cold run's would
        import traceback

        traceback.print_exc()
    import atexit

    try:
        atexit._run_exitfuncs()  # Prefect flushes its logs and events to the API, as at a cold exit
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never unwind into the warm process's loop


def adopt_environment() -> None:
    """In a forked child, after the command has set its environment defaults: Prefect's settings and logging
    configuration are rebuilt from it (they were read at import, in the warm process). A no-op elsewhere."""
    if not _FORKED:
        return
    import prefect.context
    import prefect.logging.configuration as logging_configuration

    prefect.context.refresh_global_settings_context()
    logging_env = {k: v for k, v in os.environ.items() if k.startswith("PREFECT_LOGGING")}
    if logging_env != _WARM_LOGGING_ENV:  # the same as the warm process's: its configuration stands
        logging_configuration.PROCESS_LOGGING_CONFIG = {}
        logging_configuration.setup_logging(incremental=False)


def main() -> None:
    """`python -m flows.preload SOCKET`: the warm process (microscope up starts it)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(Path(sys.argv[1]))


if __name__ == "__main__":  # run as flows.preload, not __main__: its children must see their own _FORKED
    from flows.preload import main as preload_main

    preload_main()
