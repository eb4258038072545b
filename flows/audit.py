"""The audit flow: ingest → quantize → trace → report, one task per stage (and per variant), tracked
in MLflow.

A failed stage is recorded with its one-line error; stages that needed it are skipped; everything
already computed stays in the store and the audit record is saved either way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.context import get_run_context
from prefect.states import Failed

from flows.stages import expand_stages
from microscope import audits, tracking
from microscope.errors import InputError
from microscope.stages.ingest import load_outputs
from microscope.store import open_store
from schemas.config import STAGES, AuditConfig
from schemas.records import AuditRecord, ModelRef, StageRecord, StageStatus
from tasks.ingest import ingest_task
from tasks.metrics import index_task, metrics_task, weights_task
from tasks.quantize import quantize_task
from tasks.report import report_task
from tasks.robustness import robustness_task
from tasks.sae import sae_task
from tasks.trace import trace_task
from tasks.tracking import (
    finish_run,
    log_curves,
    log_eps_curves,
    log_layer_metrics,
    log_lineage,
    log_stage,
    start_run,
)


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg if type(exc).__module__.startswith("microscope") else f"{type(exc).__name__}: {msg}"


def _run(task: Any, stage: str, store: Any, **kwargs: Any) -> StageRecord:
    """Run one stage task; a Prefect cache hit becomes status `cached` if its artifacts still exist."""
    return _settle(task(**kwargs, return_state=True), task, stage, store, kwargs)


def _run_many(task: Any, stage: str, store: Any, calls: list[dict[str, Any]]) -> list[StageRecord]:
    """Submit one task run per call (they run concurrently, on separate workers where the task runner
    has them) and settle each like _run."""
    futures = [task.submit(**kw) for kw in calls]
    for f in futures:
        f.wait()
    return [_settle(f.state, task, stage, store, kw) for f, kw in zip(futures, calls, strict=True)]


def _failed(stage: str, exc: Any) -> StageRecord:
    error = _one_line(exc) if isinstance(exc, BaseException) else str(exc)
    return StageRecord(
        stage=stage, status=StageStatus.failed, error=error, details={"input_error": isinstance(exc, InputError)}
    )


def _settle(state: Any, task: Any, stage: str, store: Any, kwargs: dict[str, Any]) -> StageRecord:
    if state.is_completed():
        rec: StageRecord = state.result()
        if state.name == "Cached":
            manifest = rec.details.get("prefix", "") + "/manifest.json"
            if not store.exists(manifest):  # the store lost it: recompute instead of trusting the cache
                get_run_logger().warning("%s: cached artifacts are gone from the store; recomputing", stage)
                return _run(task.with_options(refresh_cache=True), stage, store, **kwargs)
            rec = rec.model_copy(update={"status": StageStatus.cached})
        return rec
    return _failed(stage, state.result(raise_on_failure=False))


def _run_group(task: Any, stage: str, store: Any, names: list[str], **kwargs: Any) -> dict[str, StageRecord]:
    """Like _run, for a task returning one record per name."""
    state = task(**kwargs, return_state=True)
    if state.is_completed():
        recs: dict[str, StageRecord] = state.result()
        if state.name == "Cached":
            if not all(store.exists(r.details.get("prefix", "") + "/manifest.json") for r in recs.values()):
                get_run_logger().warning("%s: cached artifacts are gone from the store; recomputing", stage)
                return _run_group(task.with_options(refresh_cache=True), stage, store, names, **kwargs)
            recs = {k: r.model_copy(update={"status": StageStatus.cached}) for k, r in recs.items()}
        return recs
    exc = state.result(raise_on_failure=False)
    error = _one_line(exc) if isinstance(exc, BaseException) else str(exc)
    return {
        n: StageRecord(
            stage=stage, status=StageStatus.failed, error=error, details={"input_error": isinstance(exc, InputError)}
        )
        for n in names
    }


@flow(name="audit", flow_run_name="{audit_id}", validate_parameters=False)
def audit(
    audit_id: str,
    config: AuditConfig,
    model: ModelRef,
    dataset_fingerprint: str,
    stages: list[str],
    store_uri: str,
) -> AuditRecord:
    log = get_run_logger()
    store = open_store(store_uri)
    flow_run_id = str(get_run_context().flow_run.id)
    selected = expand_stages(stages)
    rec = AuditRecord(
        audit_id=audit_id,
        created_at=datetime.now(UTC),
        status=StageStatus.completed,
        model=model,
        dataset_source=config.dataset.path,
        config=config.model_dump(mode="json"),
        store_uri=store.uri,
        prefect_flow_run_id=flow_run_id,
        mlflow_tracking_uri=tracking.mlflow_tracking_uri(),
    )
    tags = {"prefect.flow_run_id": flow_run_id, "microscope.audit_id": audit_id}
    rec.mlflow_run_id = start_run(audit_id, tags, rec.config)

    def track(r: StageRecord, section: dict[str, Any]) -> StageRecord:
        stage_tags = {**tags, "microscope.model_digest": rec.model_digest or ""}
        r.mlflow_run_id = log_stage(rec.mlflow_run_id, r, section, stage_tags)
        rec.stages[r.stage] = r
        log.info("%s: %s%s", r.stage, r.status.value, f" ({r.error})" if r.error else "")
        return r

    def track_variant(fmt: str, r: StageRecord, section: dict[str, Any]) -> StageRecord:
        """A stage record of one quantized variant: its own MLflow child run, kept under rec.variants."""
        r.variant = fmt
        stage_tags = {**tags, "microscope.model_digest": rec.model_digest or "", "microscope.variant": fmt}
        r.mlflow_run_id = log_stage(rec.mlflow_run_id, r, section, stage_tags)
        rec.variants.setdefault(fmt, {})[r.stage] = r
        log.info("%s[%s]: %s%s", r.stage, fmt, r.status.value, f" ({r.error})" if r.error else "")
        return r

    ingest = None
    if "ingest" in selected:
        ingest = track(
            _run(
                ingest_task,
                "ingest",
                store,
                ref=model,
                cfg=config,
                dataset_fingerprint=dataset_fingerprint,
                store_uri=store.uri,
            ),
            {"model": config.model.model_dump(mode="json"), "dataset": config.dataset.model_dump(mode="json")},
        )
    if ingest is not None and ingest.status in (StageStatus.completed, StageStatus.cached):
        rec.model_digest = ingest.details["model_digest"]
        rec.dataset_digest = ingest.details["dataset_digest"]
        rec.architecture, rec.dataset = load_outputs(ingest, store)
        log_lineage(
            rec.mlflow_run_id,
            model.resolved_path or model.source,
            rec.model_digest,
            str(config.dataset.path),
            rec.dataset_digest,
        )
        produced: dict[str, str] = {}  # requested format -> the format made (after any fallback)
        if "quantize" in selected and config.quantize.formats:
            for fmt in config.quantize.formats:  # one task per format: a format added later is the only one computed
                q = track_variant(
                    fmt,
                    _run(
                        quantize_task,
                        "quantize",
                        store,
                        ref=model,
                        ingest=ingest,
                        fmt=fmt,
                        cfg=config,
                        store_uri=store.uri,
                    ),
                    config.quantize.model_dump(mode="json"),
                )
                if q.status != StageStatus.failed:
                    produced[fmt] = q.details["produced"]
            rec.stages["quantize"] = _aggregate("quantize", {f: v["quantize"] for f, v in rec.variants.items()})
        images = ingest.details.get("modality") == "images"
        if "trace" in selected and not images:
            track(
                _run(trace_task, "trace", store, ref=model, ingest=ingest, cfg=config, store_uri=store.uri),
                config.trace.model_dump(mode="json"),
            )
            for fmt, made in produced.items() if config.quantize.trace_variants else ():
                track_variant(
                    fmt,
                    _run(
                        trace_task,
                        "trace",
                        store,
                        ref=model,
                        ingest=ingest,
                        cfg=config,
                        store_uri=store.uri,
                        variant=made,
                    ),
                    config.trace.model_dump(mode="json"),
                )
        trace_rec = rec.stages.get("trace")
        if "sae" in selected and config.sae.hooks and trace_rec is not None and trace_rec.status != StageStatus.failed:
            variant_traces = {
                f: v["trace"]
                for f, v in rec.variants.items()
                if "trace" in v and v["trace"].status != StageStatus.failed
            }
            groups = [config.sae.hooks] if config.sae.joint else [[h] for h in config.sae.hooks]
            for hooks in groups:  # one task per SAE fans out across workers; joint: one pass for all
                results = _run_group(
                    sae_task,
                    "sae",
                    store,
                    hooks,
                    ref=model,
                    ingest=ingest,
                    trace=trace_rec,
                    hooks=hooks,
                    cfg=config,
                    store_uri=store.uri,
                    variant_traces=variant_traces,
                )
                for hook, r in results.items():
                    r.mlflow_run_id = log_stage(
                        rec.mlflow_run_id,
                        r,
                        config.sae.model_dump(mode="json"),
                        {**tags, "microscope.model_digest": rec.model_digest, "microscope.hook": hook},
                    )
                    if r.status != StageStatus.failed:
                        log_curves(r.mlflow_run_id, f"{r.details['prefix']}/curves.json", store.uri)
                    rec.saes[hook] = r
                    log.info("sae[%s]: %s%s", hook, r.status.value, f" ({r.error})" if r.error else "")
            rec.stages["sae"] = _aggregate("sae", rec.saes)
        if "metrics" in selected:
            ok_variants = {
                f: v["trace"]
                for f, v in rec.variants.items()
                if v.get("trace") and v["trace"].status != StageStatus.failed
            }
            fp_trace = rec.stages.get("trace")
            shard_calls = [
                {"ref": model, "ingest": ingest, "cfg": config, "store_uri": store.uri, "shard": i}
                for i in range(config.metrics.weight_shards)
            ]
            shards = _run_many(weights_task, "metrics", store, shard_calls)
            bad = next((s for s in shards if s.status == StageStatus.failed), None)
            try:
                compare = _compare_traces(store, config.metrics.compare_audits)
            except InputError as exc:
                compare, bad = {}, _failed("metrics", exc)
            if bad is not None:
                m = track(bad, config.metrics.model_dump(mode="json"))
            else:
                m = track(
                    _run(
                        metrics_task,
                        "metrics",
                        store,
                        ref=model,
                        ingest=ingest,
                        cfg=config,
                        store_uri=store.uri,
                        shards=shards,
                        trace=fp_trace if fp_trace and fp_trace.status != StageStatus.failed else None,
                        variant_traces=ok_variants,
                        compare=compare,
                    ),
                    config.metrics.model_dump(mode="json"),
                )
            if m.status != StageStatus.failed:
                log_layer_metrics(m.mlflow_run_id, m.details["weights"])
        metrics_rec = rec.stages.get("metrics")
        if (metrics_rec and metrics_rec.status != StageStatus.failed) or rec.saes:
            counts = index_task(
                audit_id,
                rec.model_digest,
                metrics_rec if metrics_rec and metrics_rec.status != StageStatus.failed else None,
                {h: r for h, r in rec.saes.items() if r.status != StageStatus.failed},
                store.uri,
                return_state=True,
            )
            if not counts.is_completed():
                log.warning("Qdrant indexing failed: %s", counts.result(raise_on_failure=False))
        if "robustness" in selected:
            ok_saes = {h: r for h, r in rec.saes.items() if r.status != StageStatus.failed}
            runs = ["fp"] + (
                [f for f in produced if f in config.quantize.formats] if config.robustness.variants else []
            )
            results: dict[str, StageRecord] = {}
            for variant in runs:
                r = _run(
                    robustness_task,
                    "robustness",
                    store,
                    ref=model,
                    ingest=ingest,
                    cfg=config,
                    store_uri=store.uri,
                    variant=produced.get(variant, variant),
                    saes=ok_saes if variant == "fp" else None,
                )
                section = config.robustness.model_dump(mode="json")
                r = track(r, section) if variant == "fp" else track_variant(variant, r, section)
                if r.status != StageStatus.failed:
                    log_eps_curves(r.mlflow_run_id, r.details["curves"])
                results[variant] = r
            bad = next(((v, r) for v, r in results.items() if v != "fp" and r.status == StageStatus.failed), None)
            if bad and results["fp"].status != StageStatus.failed:  # the fp record stays the stage's, marked failed
                rec.stages["robustness"] = results["fp"].model_copy(
                    update={"status": StageStatus.failed, "error": f"{bad[0]}: {bad[1].error}"}
                )
        if "report" in selected:
            done = {k: v for k, v in rec.stages.items() if v.status != StageStatus.skipped}
            report = track(
                _run(
                    report_task,
                    "report",
                    store,
                    stages=done,
                    variants=rec.variants,
                    saes=rec.saes,
                    cfg=config,
                    store_uri=store.uri,
                ),
                config.report.model_dump(mode="json"),
            )
            if report.status != StageStatus.failed:
                rec.report_uri = report.artifacts["report"]
    for s in STAGES:
        if s not in rec.stages:
            why = "not requested" if s not in selected else "an earlier stage failed"
            if s == "quantize" and s in selected and not config.quantize.formats:
                why = "no quantize.formats configured"
            if s == "sae" and s in selected and not config.sae.hooks:
                why = "no sae.hooks configured"
            if (
                s in ("trace", "sae")
                and s in selected
                and ingest is not None
                and ingest.details.get("modality") == "images"
            ):
                why = "image dataset: activations are traced and SAEs trained for text models"
            rec.stages[s] = StageRecord(stage=s, status=StageStatus.skipped, error=None, details={"reason": why})

    failed = [r for r in rec.stages.values() if r.status == StageStatus.failed]
    rec.status = StageStatus.failed if failed else StageStatus.completed
    rec.error = f"{failed[0].stage}: {failed[0].error}" if failed else None
    rec.finished_at = datetime.now(UTC)
    audits.save(store, rec)
    report_local = str(store.local_path(rec.stages["report"].details["report_key"])) if rec.report_uri else None
    finish_run(rec.mlflow_run_id, rec, report_local)
    if rec.report_uri:
        create_link_artifact(
            key="audit-report", link=_as_link(rec.report_uri), description=f"Report of audit {audit_id}"
        )
    create_markdown_artifact(key="audit-summary", markdown=_summary_md(rec), description=f"Audit {audit_id}")
    if failed:  # a Failed final state without a traceback: the error is already one clean line
        return Failed(message=rec.error)  # type: ignore[return-value]
    return rec


def _compare_traces(store: Any, audit_ids: list[str]) -> dict[str, StageRecord]:
    """The full-precision trace of each audit named in metrics.compare_audits."""
    out = {}
    for aid in audit_ids:
        other = audits.load(store, aid)
        tr = other.stages.get("trace")
        if tr is None or tr.status in (StageStatus.failed, StageStatus.skipped):
            raise InputError(
                f"metrics.compare_audits: audit '{other.audit_id}' has no finished trace; "
                "compare only with audits that traced layers (trace stage completed)"
            )
        out[other.audit_id] = tr
    return out


def _aggregate(stage: str, records: dict[str, StageRecord]) -> StageRecord:
    """One record for a stage that ran per variant or per hook: failed if any failed, cached if all were."""
    statuses = {r.status for r in records.values()}
    if StageStatus.failed in statuses:
        status = StageStatus.failed
    elif statuses == {StageStatus.cached}:
        status = StageStatus.cached
    else:
        status = StageStatus.completed
    failed = [(name, r) for name, r in records.items() if r.status == StageStatus.failed]
    return StageRecord(
        stage=stage,
        status=status,
        metrics={"succeeded": float(len(records) - len(failed)), "failed": float(len(failed))},
        details={"parts": {name: r.status.value for name, r in records.items()}},
        error=f"{failed[0][0]}: {failed[0][1].error}" if failed else None,
        seconds=sum(r.seconds or 0.0 for r in records.values()),
    )


def _as_link(uri: str) -> str:
    return uri if "://" in uri else f"file://{uri}"


def _summary_md(rec: AuditRecord) -> str:
    rows = "\n".join(
        f"| {r.stage} | {r.status.value} | {'' if r.seconds is None else f'{r.seconds:.2f}'} | {r.error or ''} |"
        for r in rec.stages.values()
    )
    return (
        f"# Audit `{rec.audit_id}`\n\nModel digest `{(rec.model_digest or '')[:16]}`, dataset digest "
        f"`{(rec.dataset_digest or '')[:16]}`.\n\n| stage | status | seconds | error |\n|---|---|---|---|\n{rows}\n\n"
        f"Report: {rec.report_uri or '—'}\n\nMLflow run `{rec.mlflow_run_id}` at `{rec.mlflow_tracking_uri}`\n"
    )
