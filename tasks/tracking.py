"""MLflow calls as tasks: retried on network errors, never cached (each audit gets its own runs)."""

from __future__ import annotations

from typing import Any

from microscope import tracking
from prefect import task
from prefect.cache_policies import NO_CACHE
from schemas.records import AuditRecord, StageRecord

from tasks.common import RETRIES, RETRY_DELAYS, retry_transient

_opts: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_condition_fn": retry_transient,
}


@task(name="mlflow-start", **_opts)
def start_run(audit_id: str, tags: dict[str, str], config: dict[str, Any]) -> str:
    return tracking.start_audit_run(audit_id, tags, config)


@task(name="mlflow-lineage", **_opts)
def log_lineage(run_id: str, model_uri: str, model_digest: str, dataset_uri: str, dataset_digest: str) -> None:
    tracking.log_lineage(run_id, model_uri, model_digest, dataset_uri, dataset_digest)


@task(name="mlflow-stage", **_opts)
def log_stage(parent_run_id: str, record: StageRecord, config: dict[str, Any], tags: dict[str, str]) -> str:
    return tracking.log_stage(parent_run_id, record, config, tags)


@task(name="mlflow-finish", **_opts)
def finish_run(run_id: str, record: AuditRecord, report_path: str | None) -> None:
    if report_path:
        tracking.log_file(run_id, report_path)
    tracking.finish_audit_run(run_id, record)


@task(name="mlflow-curves", **_opts)
def log_curves(run_id: str, curves_key: str, store_uri: str) -> None:
    from microscope.store import open_store

    tracking.log_curves(run_id, open_store(store_uri).get_json(curves_key))


@task(name="mlflow-layers", **_opts)
def log_layer_metrics(run_id: str, rows: list[dict[str, Any]]) -> None:
    tracking.log_layer_metrics(run_id, rows)


@task(name="mlflow-eps-curves", **_opts)
def log_eps_curves(run_id: str, curves: dict[str, list[float]]) -> None:
    tracking.log_eps_curves(run_id, curves)


@task(name="mlflow-reliability", **_opts)
def log_reliability(run_id: str, details: dict[str, Any]) -> None:
    tracking.log_reliability(run_id, details)
