"""MLflow lineage: one parent run per audit, one child run per stage.

SQLite under the workspace by default; the settings' MLflow URI (`MLFLOW_TRACKING_URI`) wins. Params are the stage's config,
metrics its summary figures, inputs the model and dataset by digest and URI.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from schemas.gates import GateVerdict
from schemas.records import AuditRecord, StageRecord

from microscope.settings import Settings, get_settings

_READY: set[str] = set()  # tracking URIs whose schema this process has seen created
_READY_LOCK = threading.Lock()


def _mlflow() -> Any:
    import mlflow

    s = get_settings()  # MLflow's one connection point: what it needs is passed on from here
    uri = s.mlflow_uri
    mlflow.set_tracking_uri(uri)
    if uri not in _READY:
        _create_schema_once(mlflow, uri, s)
    return mlflow


def _create_schema_once(mlflow: Any, uri: str, s: Settings) -> None:
    """The first client of a fresh database creates MLflow's schema; two processes doing it at once
    fail with `table experiments already exists`. So the first touch happens under a machine-wide lock."""
    from microscope.locks import stage_lock

    if uri.startswith("sqlite:///"):
        s.home_dir.mkdir(parents=True, exist_ok=True)
    with _READY_LOCK, stage_lock(f"mlflow-schema|{uri}", lock_dir=s.lock_dir):
        if uri.startswith("sqlite:///"):
            _from_template(mlflow, Path(uri.removeprefix("sqlite:///")), s.cache_dir)
        mlflow.MlflowClient().search_experiments(max_results=1)
        _READY.add(uri)


def _from_template(mlflow: Any, db: Path, cache: Path) -> None:
    """A new SQLite database starts as a copy of an empty one this MLflow version migrated once (kept in the
    cache folder): MLflow's migrations are seconds of CPU that every new workspace would pay again."""
    if db.exists():
        return
    from microscope.locks import stage_lock

    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with stage_lock(f"mlflow-template|{template}", lock_dir=cache):
            if not template.exists():
                tmp = template.with_suffix(f".{os.getpid()}.tmp")
                tmp.unlink(missing_ok=True)
                mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
                os.replace(tmp, template)
    tmp = db.with_suffix(f".{os.getpid()}.tmp")
    shutil.copyfile(template, tmp)
    os.replace(tmp, db)


def _experiment_id(mlflow: Any) -> str:
    s = get_settings()
    exp = mlflow.get_experiment_by_name(s.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow.create_experiment(s.experiment, artifact_location=s.mlflow_artifact_root)
    except Exception:  # noqa: BLE001 -- another process created it first
        return mlflow.get_experiment_by_name(s.experiment).experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def start_audit_run(audit_id: str, tags: dict[str, str], config: dict[str, Any]) -> str:
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    run = client.create_run(_experiment_id(mlflow), run_name=audit_id, tags={"microscope.audit_id": audit_id, **tags})
    params = flatten(config)
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_lineage(run_id: str, model_uri: str, model_digest: str, dataset_uri: str, dataset_digest: str) -> None:
    """Model and dataset as MLflow inputs, identified by digest: the audit's lineage."""
    mlflow = _mlflow()
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with mlflow.start_run(run_id=run_id):
        for uri, digest, context in ((model_uri, model_digest, "model"), (dataset_uri, dataset_digest, "dataset")):
            try:
                source = resolve_dataset_source(uri)
            except Exception:  # noqa: BLE001 -- a hub id or other non-artifact URI
                from mlflow.data.http_dataset_source import HTTPDatasetSource

                source = HTTPDatasetSource(f"https://huggingface.co/{uri}")
            name = os.path.basename(uri.rstrip("/")) or uri
            _log_input(mlflow, MetaDataset(source, name=name, digest=digest[:36]), context)
        mlflow.set_tags({"microscope.model_digest": model_digest, "microscope.dataset_digest": dataset_digest})


def _log_input(mlflow: Any, dataset: Any, context: str, attempts: int = 5) -> None:
    """MLflow checks for the dataset, then inserts it: two audits registering the same model at once
    collide on the unique key. The loser tries again and finds the winner's row."""

    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as exc:
            if "UNIQUE constraint" not in str(exc) and "duplicate key" not in str(exc) or i == attempts - 1:
                raise
            time.sleep(0.2 * (i + 1))


def log_stage(parent_run_id: str, record: StageRecord, config: dict[str, Any], tags: dict[str, str]) -> str:
    """A child run for one stage (cached stages too, tagged as such)."""
    mlflow = _mlflow()
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient()
    exp = client.get_run(parent_run_id).info.experiment_id
    all_tags = {
        "mlflow.parentRunId": parent_run_id,
        "microscope.stage": record.stage,
        "microscope.status": record.status.value,
        "microscope.config_hash": record.config_hash or "",
        **tags,
    }
    if record.variant:
        all_tags["microscope.variant"] = record.variant
    name = f"{record.stage}[{record.variant}]" if record.variant else record.stage
    run = client.create_run(exp, run_name=name, tags=all_tags)
    rid = run.info.run_id

    now = int(time.time() * 1000)
    params = [Param(k, v) for k, v in sorted(flatten(config).items())]
    metrics = [Metric(k, float(v), now, 0) for k, v in sorted(record.metrics.items())]
    if record.seconds is not None:
        metrics.append(Metric("seconds", record.seconds, now, 0))
    for i in range(0, max(len(params), len(metrics)), 100):
        client.log_batch(rid, metrics=metrics[i : i + 100], params=params[i : i + 100])
    # The same content as the stage's manifest.json in the artifact store.
    client.log_dict(rid, {"record": record.model_dump(mode="json")}, "manifest.json")
    status = "FAILED" if record.status.value == "failed" else "FINISHED"
    client.set_terminated(rid, status=status)
    return rid


def log_file(run_id: str, path: str, artifact_path: str | None = None) -> None:
    mlflow = _mlflow()
    mlflow.MlflowClient().log_artifact(run_id, path, artifact_path)


def finish_audit_run(run_id: str, record: AuditRecord) -> None:
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    client.log_dict(run_id, record.model_dump(mode="json"), "audit_record.json")
    client.set_terminated(run_id, status="FAILED" if record.status.value == "failed" else "FINISHED")


def audit_runs(audit_id: str) -> tuple[Any, list[Any]]:
    """(parent run, child runs) of one audit: for `show` and the tests."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(get_settings().experiment)
    parents = client.search_runs([exp.experiment_id], f"tags.`microscope.audit_id` = '{audit_id}'")
    if not parents:
        return None, []
    parent = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


def mlflow_tracking_uri() -> str:
    """The tracking URI with any password masked: it goes into records and logs."""
    from urllib.parse import urlsplit, urlunsplit

    uri = get_settings().mlflow_uri
    parts = urlsplit(uri)
    if not parts.password:
        return uri  # untouched: urlunsplit would rewrite sqlite:////abs/path
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def log_curves(run_id: str, curves: list[dict[str, float]]) -> None:
    """Training curves as metric histories, the step as MLflow's step."""
    mlflow = _mlflow()

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"train_{k}", float(v), now, int(row["step"])) for row in curves for k, v in row.items() if k != "step"
    ]
    client = mlflow.MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def log_layer_metrics(run_id: str, rows: list[dict[str, Any]]) -> None:
    """Per-layer weight statistics with the block index as MLflow's step (one series per matrix kind)."""
    import math

    from mlflow.entities import Metric

    mlflow = _mlflow()
    now = int(time.time() * 1000)
    keys = ("alpha", "alpha_weighted", "spectral_norm", "effective_rank", "stable_rank", "condition_number")
    metrics = []
    for r in rows:
        if r["layer"] < 0:
            continue
        kind = r["name"].split(".", 3)[-1].replace(".", "_") if r["name"].count(".") >= 3 else r["name"]
        for k in keys:
            v = r.get(k)
            if isinstance(v, float | int) and math.isfinite(v):
                metrics.append(Metric(f"{kind}.{k}"[:250], float(v), now, int(r["layer"])))
    client = mlflow.MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def log_eps_curves(run_id: str, curves: dict[str, list[float]]) -> None:
    """Accuracy-vs-ε curves: one metric history per attack with the sweep index as MLflow's step, and ε
    itself (box units) as the `eps` history at the same steps."""

    from mlflow.entities import Metric

    mlflow = _mlflow()
    now = int(time.time() * 1000)
    metrics = [Metric("eps", float(e), now, i) for i, e in enumerate(curves["eps"])]
    for attack in ("pgd", "fgsm", "noise"):
        metrics += [Metric(f"{attack}_accuracy", float(v), now, i) for i, v in enumerate(curves.get(attack, []))]
    mlflow.MlflowClient().log_batch(run_id, metrics=metrics)


def log_reliability(run_id: str, details: dict[str, Any]) -> None:
    """The reliability diagram as metric histories over the bins (per-bin accuracy, confidence and count,
    the bin index as MLflow's step), and the stage's figures that do not fit a number (the diagrams before
    and after temperature scaling, the ROC curves, corruption accuracies) as `reliability.json`."""
    from mlflow.entities import Metric

    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    diagram = (details.get("calibration") or {}).get("diagram")
    if diagram:
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"reliability_bin_{k}", float(v), now, i)
            for k in ("accuracy", "confidence", "count")
            for i, v in enumerate(diagram[k])
            if v is not None
        ]
        client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, details, "reliability.json")


def metric_key(name: str) -> str:
    """A rule name as an MLflow key (alphanumerics, _ - . space / only)."""
    import re

    return re.sub(r"[^\w\-. /]", "_", name).strip() or "rule"


def log_gate(run_id: str, verdict: GateVerdict) -> None:
    """The verdict on the audit's run: tag `gate` = pass | warn | fail (and the baseline), one metric per
    judged rule `gate.<rule>` (what its check compared), `gate.failed` and `gate.warned` counts."""
    mlflow = _mlflow()
    from mlflow.entities import Metric, RunTag

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    tags = [
        RunTag("gate", verdict.verdict),
        RunTag("gate.baseline", verdict.baseline_audit_id or "none"),
        RunTag("gate.rules_digest", verdict.rules_digest),
    ]
    metrics = [
        Metric(f"gate.{metric_key(r.rule)}", float(r.compared), now, 0)
        for r in verdict.results
        if r.compared is not None
    ]
    metrics += [
        Metric("gate.failed", float(len(verdict.failed)), now, 0),
        Metric("gate.warned", float(len(verdict.warned)), now, 0),
    ]
    for i in range(0, max(len(metrics), 1), 100):
        client.log_batch(run_id, metrics=metrics[i : i + 100], tags=tags if i == 0 else [])
