"""Start an audit from the viewer's launch form and follow it.

With a Prefect server configured (PREFECT_API_URL) the audit is a flow run of the audit deployment
(settings.audit_deployment), started as `flows/watch.py` starts them; without one it is `microscope run`
in a detached process of this machine, its output in a log file under the workspace. Either way the
audit id is chosen here, so the record it saves (`audits/<id>.json`) is found again. Prefect is imported
inside the functions that use it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from microscope.errors import InputError
from microscope.settings import Settings, get_settings
from schemas.config import STAGES, AuditConfig, ConfigError, resolve_config

Via = Literal["auto", "deployment", "local"]
FINAL = ("completed", "failed", "partial", "crashed", "cancelled")
# the console's stage lines (flows/tracker.summary_line):
# `HH:MM:SS.mmm | INFO    | Flow run 'ID' - trace[int8]: completed in 1.2 s (...)`
_STAGE_LINE = re.compile(r" - ([a-z]+)(?:\[[^\]]*\])?: (started|completed|cached|partial|failed|skipped)\b")


@dataclass(frozen=True)
class LaunchForm:
    """The form's fields as typed: text where a user types, lists where a user picks."""

    model: str
    dataset: str = ""
    config: str = ""  # a YAML file or a name under examples/ the fields below override; empty: the defaults
    formats: tuple[str, ...] = ()
    layers: str = "all"  # 'all' or block indices separated by commas (negative counts from the end)
    hooks: tuple[str, ...] = ("resid",)
    stages: tuple[str, ...] = ()  # empty: every stage
    run_id: str = ""
    step: str = ""
    tags: str = ""  # key=value, one per line


@dataclass(frozen=True)
class Handle:
    """What was started: a flow run of the deployment, or a local process."""

    kind: Literal["deployment", "local"]
    audit_id: str
    store: str
    stages: tuple[str, ...]
    flow_run_id: str | None = None
    pid: int | None = None
    log: str | None = None
    api_url: str | None = None  # the Prefect server of a deployment's flow run


@dataclass
class Progress:
    state: str  # scheduled | pending | running | completed | partial | failed | crashed | cancelled
    stages: dict[str, str] = field(default_factory=dict)  # stage -> pending | running | completed | cached | ...
    message: str = ""
    flow_run_state: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINAL


def _layers(text: str) -> list[int] | str:
    text = text.strip()
    if text in ("", "all"):
        return "all"
    try:
        return [int(x) for x in re.split(r"[,\s]+", text) if x]
    except ValueError:
        raise InputError(
            f"layers: {text!r} is not 'all' or block indices like 0, 1, -1; fix the layers field"
        ) from None


def parse_tags(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, eq, value = line.strip().partition("=")
        if not eq or not key.strip():
            raise InputError(f"tags: {line.strip()!r} is not key=value; write one tag per line, like branch=main")
        out[key.strip()] = value.strip()
    return out


def _step(form: LaunchForm) -> int | None:
    if not form.step.strip():
        return None
    if not form.step.strip().isdigit():
        raise InputError(f"step: {form.step!r} is not a whole number; give the checkpoint's training step")
    if not form.run_id.strip():
        raise InputError("run id: a step needs the training run it belongs to; fill in run id or clear step")
    return int(form.step)


def validate(form: LaunchForm) -> AuditConfig:
    """The audit config the form describes, checked by the config's own validation; a wrong field raises
    InputError in one line that names it."""
    from flows.stages import expand_stages
    from microscope.models import checkpoint

    if not form.model.strip():
        raise InputError("model: no model given; pass an HF folder, a .safetensors file, an s3:// URI or a hub id")
    model = form.model.strip()
    if checkpoint.looks_like_path(model) and not model.startswith("s3://") and not Path(model).expanduser().exists():
        raise InputError(f"model: {model} does not exist; pass an HF folder, a weights file or a hub id")
    dataset = form.dataset.strip() or None
    if (
        dataset
        and checkpoint.looks_like_path(dataset)
        and "://" not in dataset
        and not Path(dataset).expanduser().exists()
    ):
        raise InputError(f"dataset: {dataset} does not exist; pass a .txt/.jsonl/.parquet/.npz file or an HF dataset")
    overrides: dict[str, Any] = {"model.source": model, "dataset.path": dataset, "trace.layers": _layers(form.layers)}
    if form.formats:
        overrides["quantize.formats"] = list(form.formats)
    if form.hooks:
        overrides["trace.hooks"] = list(form.hooks)
    try:
        cfg = resolve_config(form.config.strip() or None, overrides)
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    try:
        expand_stages(list(form.stages))
    except ValueError as exc:
        raise InputError(f"stages: {exc}") from None
    parse_tags(form.tags)
    _step(form)
    return cfg


def submit(form: LaunchForm, store: str | None = None, via: Via = "auto", settings: Settings | None = None) -> Handle:
    """Start the audit the form describes (validated first); `via` auto: the deployment when a Prefect server is
    configured, else a local `microscope run`."""
    from microscope import audits

    s = settings or get_settings()
    cfg = validate(form)
    audit_id = audits.new_audit_id()
    store = store or s.store_uri
    from flows.stages import expand_stages

    stages = tuple(expand_stages(list(form.stages)))
    if via == "deployment" or (via == "auto" and s.prefect_api_url):
        if not s.prefect_api_url:
            raise InputError(
                "no Prefect server: set PREFECT_API_URL (or `microscope up`) to start the audit deployment"
            )
        fr = _run_deployment(form, cfg, audit_id, store, s)
        return Handle("deployment", audit_id, store, stages, flow_run_id=fr, api_url=s.prefect_api_url)
    pid, log = _run_local(form, cfg, audit_id, store, s)
    return Handle("local", audit_id, store, stages, pid=pid, log=str(log))


def _run_deployment(form: LaunchForm, cfg: AuditConfig, audit_id: str, store: str, s: Settings) -> str:
    from prefect.deployments import run_deployment

    params: dict[str, Any] = {
        "model": cfg.model.source,
        "dataset": cfg.dataset.path,
        "config": cfg.model_dump(mode="json"),  # inline: the flow validates it again with the same models
        "run_id": form.run_id.strip() or None,
        "step": _step(form),
        "stages": list(form.stages) or None,
        "store": store,
        "audit_id": audit_id,
    }
    if tags := parse_tags(form.tags):
        params["tags"] = tags
    try:
        with _api(s.prefect_api_url):
            fr = run_deployment(s.audit_deployment, parameters=params, timeout=0, as_subflow=False)
    except Exception as exc:  # noqa: BLE001 -- the client's errors (unknown deployment, server down) are many
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(
            f"could not start deployment {s.audit_deployment} on {s.prefect_api_url} ({first}); register it with "
            "`make deploy` or `microscope up`, or set MICROSCOPE_AUDIT_DEPLOYMENT"
        ) from None
    return str(fr.id)


def _api(url: str | None) -> Any:
    """Prefect's client pointed at the server our settings name (read at the entry point, as every setting is),
    whatever Prefect's own settings held when it was imported."""
    from contextlib import nullcontext

    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: url}) if url else nullcontext()


def _run_local(form: LaunchForm, cfg: AuditConfig, audit_id: str, store: str, s: Settings) -> tuple[int, Path]:
    import yaml

    folder = s.home_dir / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{audit_id}.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    argv = [sys.executable, "-m", "flows.cli", "--store", store, "run", "--config", str(config)]
    argv += ["--model", str(cfg.model.source), "--audit-id", audit_id]
    argv += ["--dataset", cfg.dataset.path] if cfg.dataset.path else []
    argv += ["--stages", ",".join(form.stages)] if form.stages else []
    argv += ["--run-id", form.run_id.strip()] if form.run_id.strip() else []
    argv += ["--step", str(_step(form))] if _step(form) is not None else []
    for k, v in parse_tags(form.tags).items():
        argv += ["--tag", f"{k}={v}"]
    log = folder / f"{audit_id}.log"
    with open(log, "wb") as out:  # the child keeps its own descriptor; ours closes here
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # the viewer's workspace, named outright: a relative default home would follow another cwd
            env={**os.environ, "MICROSCOPE_HOME": str(s.home_dir)},
            start_new_session=True,  # detached: closing the viewer does not stop the audit
        )
    return proc.pid, log


def progress(handle: Handle) -> Progress:
    """Where the audit stands: the saved record's stages once it exists; until then the flow run's state and
    task runs (a deployment) or the process and its log's stage lines (a local run)."""
    from microscope import audits
    from microscope.store import open_store

    store = open_store(handle.store)
    if store.exists(f"audits/{handle.audit_id}.json"):
        rec = audits.load(store, handle.audit_id)
        stages = {
            name: r.status.value
            for name, r in rec.stages.items()
            if not (r.status.value == "skipped" and r.details.get("reason") == "not requested")
        }
        return Progress(rec.status.value, stages, rec.error or f"audit {rec.audit_id} {rec.status.value}")
    stages = {s: "pending" for s in handle.stages or STAGES}
    if handle.kind == "deployment":
        return _flow_run_progress(handle, stages)
    return _local_progress(handle, stages)


def _mark_running(stages: dict[str, str]) -> None:
    first = next((s for s, v in stages.items() if v == "pending"), None)
    if first is not None and "running" not in stages.values():
        stages[first] = "running"


def _local_progress(handle: Handle, stages: dict[str, str]) -> Progress:
    text = Path(handle.log).read_text(errors="replace") if handle.log and Path(handle.log).is_file() else ""
    for m in _STAGE_LINE.finditer(text):
        if m.group(1) in stages:  # a variant's line (`trace[int8]: started`) marks its stage running too
            stages[m.group(1)] = "running" if m.group(2) == "started" else m.group(2)
    if _alive(handle.pid):
        _mark_running(stages)
        return Progress("running", stages, f"process {handle.pid} running; log {handle.log}")
    last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "no output")
    return Progress("crashed", stages, f"process {handle.pid} ended without a record: {last[:300]} (log {handle.log})")


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:  # our own child: reap it, or it stays a zombie that looks alive
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:  # started by another viewer process: ask the system
        pass
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _flow_run_progress(handle: Handle, stages: dict[str, str]) -> Progress:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _api(handle.api_url), get_client(sync_client=True) as client:
        fr = client.read_flow_run(handle.flow_run_id)  # type: ignore[arg-type]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
    state = fr.state.type.value.lower() if fr.state else "scheduled"
    for tr in runs:
        stage = tr.name.split("-", 1)[0].removesuffix("_task")
        stage = "metrics" if stage in ("weights", "index") else stage
        if stage in stages and tr.state is not None:
            done = tr.state.is_completed() or tr.state.is_failed() or tr.state.is_crashed()
            stages[stage] = tr.state.type.value.lower() if done else "running"
    name = fr.state.name if fr.state else "Scheduled"
    if state in ("failed", "crashed", "cancelled"):  # the flow ended without saving the record
        msg = (fr.state.message if fr.state else "") or name
        return Progress(state, stages, f"flow run {fr.name}: {msg}", name)
    shown = "running" if state == "completed" else state  # completed but the record not visible yet
    if shown == "running":
        _mark_running(stages)
    return Progress(shown, stages, f"flow run {fr.name}: {name}", name)
