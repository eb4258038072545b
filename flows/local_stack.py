"""`microscope up`: the whole system on one machine, for a laptop and for the demo.

    Prefect server (unless PREFECT_API_URL names one) → the audit deployment served by this process
    (`audit/checkpoint`, runs one at a time by default) → the webhook receiver training jobs POST to

All three share this process's settings, so the audits a training job starts land in the same store,
MLflow and Qdrant as `microscope run`, `list` and `view` read. While it is up, `microscope run` in the
same workspace uses its Prefect server (no temporary server per audit; the run shows in the same UI):
the stack writes `home/stack.json`, removed when it stops.

`microscope run` itself runs in a forked child of the stack's warm process (flows/preload.py), which has
imported everything already: a cached audit answers in about a second.

Audits run in the served process's subprocesses with `execution: local`: every stage in one process,
which is what a small model wants (a child flow run per stage costs a fresh process of imports each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

STACK_FILE = "stack.json"


def _healthy(url: str, timeout_s: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001 -- anything but a 200 is "not up"
        return False


def _wait(url: str, timeout_s: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not _healthy(url, 1.0):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering {url}; see its log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s; see its log")
        time.sleep(0.25)


def _wait_socket(path: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    """The warm process binds its socket once it has imported everything."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the warm process exited with {proc.returncode}; see its log (warm.log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm process did not open {path} within {timeout_s:.0f} s; see warm.log")
        time.sleep(0.1)


def running_stack(home: Path) -> dict[str, str] | None:
    """The stack this workspace has up (its Prefect API answers), or None. Cheap: one local request."""
    path = home / STACK_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _healthy(f"{info['prefect_api_url']}/health", 0.3):
        return None
    return info


@dataclass
class LocalStack:
    home: Path
    port: int = 4200
    webhook_port: int = 8080
    host: str = "127.0.0.1"
    ui: bool = True
    procs: list[subprocess.Popen] = field(default_factory=list)

    def _spawn(self, args: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen:
        log = open(self.home / "logs" / log_name, "a")
        p = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def start(self) -> dict[str, str]:
        """Start what is missing; returns the URLs. Sets PREFECT_API_URL in this process for the serve loop,
        so call it before anything imports prefect (Prefect reads its settings once, at import)."""
        from flows import preload

        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        warm = None
        if preload.supported():  # its imports overlap the server's start
            sock = preload.socket_path(self.home)
            warm = (sock, self._spawn([sys.executable, "-m", "flows.preload", str(sock)], "warm.log", env))
        api = os.environ.get("PREFECT_API_URL")
        if not api:  # a server of this workspace's own, kept in home/prefect so the UI keeps its history
            api = f"http://{self.host}:{self.port}/api"
            if not _healthy(f"{api}/health"):
                server_env = {**env, "PREFECT_HOME": str(self.home / "prefect"), "PREFECT_UI_ENABLED": str(self.ui)}
                server_env.pop("PREFECT_API_URL", None)
                cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(self.port)]  # fmt: skip
                p = self._spawn(cmd, "prefect-server.log", server_env)
                _wait(f"{api}/health", 180, p, "the Prefect server")
        os.environ["PREFECT_API_URL"] = api
        env["PREFECT_API_URL"] = api
        hook = f"http://{self.host}:{self.webhook_port}"
        if _healthy(f"{hook}/healthz"):  # another stack's receiver would take our checkpoints to its server
            raise RuntimeError(
                f"port {self.webhook_port} already has a webhook receiver; stop it or pass --webhook-port"
            )
        for k, v in laptop_webhook_settings(self.host).items():  # the receiver's, and the served audits' callbacks
            os.environ[k] = env[k] = v
        cmd = [sys.executable, "-m", "flows.cli", "webhook", "serve", "--host", self.host]
        p = self._spawn([*cmd, "--port", str(self.webhook_port)], "webhook.log", env)
        _wait(f"{hook}/healthz", 60, p, "the webhook receiver")
        info = {
            "prefect_api_url": api,
            "prefect_ui_url": api.removesuffix("/api") if self.ui else "",
            "webhook_url": f"{hook}/v1/checkpoints",
            "pid": str(os.getpid()),
        }
        if warm is not None:
            _wait_socket(*warm, 180)
            info["warm_socket"] = str(warm[0])
        (self.home / STACK_FILE).write_text(json.dumps(info, indent=2))
        return info

    def stop(self) -> None:
        (self.home / STACK_FILE).unlink(missing_ok=True)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def laptop_webhook_settings(host: str) -> dict[str, str]:
    """What a stack listening on loopback accepts unless the environment says otherwise: checkpoints at any local
    path (the trainer writes them to this disk) and result callbacks to this machine (the trainer listens here).
    Its senders are on this machine already; a stack on another address keeps the strict defaults."""
    from microscope.settings import get_settings

    if host != "localhost" and not _is_loopback(host):
        return {}
    given = get_settings().model_fields_set
    out = {}
    if "webhook_checkpoint_roots" not in given:
        out["MICROSCOPE_WEBHOOK_CHECKPOINT_ROOTS"] = "s3:// /"
    if "callback_allow_private" not in given:
        out["MICROSCOPE_CALLBACK_ALLOW_PRIVATE"] = "true"
    return out


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_audits(limit: int) -> None:
    """Serve the audit flow as the deployment the receiver starts (blocks until interrupted)."""
    from flows.audit import audit
    from microscope.settings import get_settings

    flow_name, _, name = get_settings().audit_deployment.partition("/")
    if flow_name != audit.name:
        raise ValueError(
            f"MICROSCOPE_AUDIT_DEPLOYMENT={get_settings().audit_deployment!r} is not a deployment of the "
            f"'{audit.name}' flow; use audit/<name> with `microscope up`"
        )
    audit.serve(name=name, limit=limit, print_starting_message=False, pause_on_shutdown=False)


def secret_file(home: Path) -> str:
    """The workspace's signing secret in home/webhook.secret, made once (mode 600)."""
    import base64
    import secrets

    path = home / "webhook.secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
    return path.read_text().strip()


def webhook_secret(home: Path) -> str:
    """The receiver's signing secret: MICROSCOPE_WEBHOOK_SECRET, else the workspace's (`secret_file`),
    exported to this process and its children. Returns where it came from."""
    from microscope.settings import get_settings

    if get_settings().webhook_secrets():
        return "secret from MICROSCOPE_WEBHOOK_SECRET"
    os.environ["MICROSCOPE_WEBHOOK_SECRET"] = secret_file(home)
    path = home / "webhook.secret"
    return f"secret in {path}: export MICROSCOPE_WEBHOOK_SECRET=$(cat {path})"
