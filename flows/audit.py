"""The audit flow. Its entry takes plain JSON values (a deployment, a schedule, a webhook or the CLI
can start it) and runs the DAG

    ingest → quantize (per format) → trace (fp + per variant) → sae (per hook) → metrics → landscape
    (fp + per variant) → robustness (fp + per variant) → reliability (fp, then per variant) → attribution
    (fp + per variant) → report

A failed stage is recorded with its one-line error (traceback in a log file beside the audit record);
stages that needed it are skipped; a failed variant never takes the others down (the stage ends
`partial`); everything computed stays in the store and the audit record is saved either way.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.states import Failed

from flows.gate import emit as emit_gate_event
from flows.gate import run_gate
from flows.settle import Settler, one_line
from flows.stages import expand_stages
from flows.tracker import OK, AuditTracker
from microscope import audits
from microscope.errors import InputError
from microscope.feature_matching import describe, match_run_previous
from microscope.gates import load_rules
from microscope.models.loading import resolve
from microscope.result_callback import failed_payload, post_result, result_payload
from microscope.stages.ingest import dataset_fingerprint, load_outputs
from microscope.store import ArtifactStore, open_store
from schemas.config import AuditConfig, resolve_config
from schemas.records import ModelRef, StageRecord, StageStatus
from schemas.stages import FP, AuditRequest, IngestOutput
from tasks.attribution import attribution_task
from tasks.ingest import ingest_task
from tasks.landscape import landscape_task
from tasks.metrics import index_task, metrics_task, weights_task
from tasks.quantize import quantize_task
from tasks.reliability import reliability_task
from tasks.report import report_task
from tasks.robustness import robustness_task
from tasks.sae import sae_task
from tasks.trace import trace_task
from tasks.tracking import log_curves, log_eps_curves, log_layer_metrics, log_lineage, log_reliability


def _run_name() -> str:
    """The flow run is named by its audit id: the one given, or a new one."""
    from prefect.runtime import flow_run

    return flow_run.parameters.get("audit_id") or audits.new_audit_id()


@flow(name="audit", flow_run_name=_run_name, validate_parameters=True)
def audit(
    model: str,
    dataset: str | None = None,
    config: str | dict[str, Any] | None = None,
    run_id: str | None = None,
    step: int | None = None,
    tags: dict[str, str] | None = None,
    stages: list[str] | None = None,
    store: str | None = None,
    audit_id: str | None = None,
    callback_url: str | None = None,
) -> dict[str, Any]:
    """Audit the checkpoint at `model` (folder, file, hub id, s3://) on `dataset`, with `config` a YAML path,
    a name under examples/ or an inline mapping; `run_id`/`step` place it in a training run; the result is
    POSTed, signed, to `callback_url` when the audit ends."""
    ctx = get_run_context()
    flow_run_id = str(ctx.flow_run.id)
    try:  # what the caller got wrong fails here, before anything runs
        cfg = resolve_config(config, {"model.source": model, "dataset.path": dataset})
        ref = resolve(cfg.model)
        st = open_store(store)
        st.check_writable()
        if cfg.gate.rules is not None:  # bad rules are the caller's error: refuse before anything runs
            load_rules(cfg.gate.rules)
        req = AuditRequest(
            audit_id=audit_id or ctx.flow_run.name,
            run_id=run_id,
            step=step,
            tags=tags or {},
            stages=expand_stages(stages),
            store_uri=st.uri,
        )
    except Exception as exc:
        if callback_url:  # the training job hears about a refused audit too
            head = {"audit_id": audit_id or ctx.flow_run.name, "run_id": run_id, "step": step}
            _call_back(callback_url, failed_payload(head, model, flow_run_id, one_line(exc)))
        raise
    rec = run_pipeline(req, cfg, ref, dataset_fingerprint(cfg.dataset.path), st, flow_run_id)
    if callback_url:
        _call_back(callback_url, result_payload(rec, model, flow_run_id))
    if rec.status == StageStatus.failed:  # a Failed final state without a traceback: the error is one line
        return Failed(message=rec.error)  # type: ignore[return-value]
    return {"audit_id": rec.audit_id, "status": rec.status.value, "report": rec.report_uri, "error": rec.error}


def _call_back(url: str, payload: dict[str, Any]) -> None:
    from microscope.settings import get_settings

    log = get_run_logger()
    secrets = get_settings().webhook_secrets()
    if not secrets:
        log.warning("callback to %s not sent: MICROSCOPE_WEBHOOK_SECRET is not set (results are only sent signed)", url)
        return
    why = post_result(url, payload, secrets[0])
    if why:
        log.warning("callback not delivered: %s", why)
    else:
        log.info("result sent to %s", url)


def run_pipeline(
    req: AuditRequest, cfg: AuditConfig, ref: ModelRef, data_fp: str, store: ArtifactStore, flow_run_id: str
) -> Any:
    t = AuditTracker(req, cfg, ref, store, flow_run_id)
    s = Settler(store, req.audit_id)
    why: dict[str, str] = {}
    ing = _ingest(t, s, ref, cfg, data_fp)
    if ing is not None:
        produced = _quantize(t, s, ing) if "quantize" in req.stages and cfg.quantize.formats else {}
        if ing.images:
            why |= {
                st: "image dataset: activations are traced and SAEs trained for text models" for st in ("trace", "sae")
            }
        elif "trace" in req.stages:
            _trace(t, s, ing, produced)
        if "sae" in req.stages and cfg.sae.hooks and _ok(t.rec.stages.get("trace")):
            _sae(t, s, ing)
        if "metrics" in req.stages:
            _metrics(t, s, ing)
        _index(t, ing)
        if "landscape" in req.stages:
            _per_variant(t, s, ing, "landscape", produced if cfg.landscape.variants else {})
        if "robustness" in req.stages:
            _robustness(t, s, ing, produced)
        if "reliability" in req.stages:
            _reliability(t, s, ing, produced)
        if "attribution" in req.stages:
            _per_variant(t, s, ing, "attribution", produced if cfg.attribution.variants else {})
        verdict = run_gate(t) if cfg.gate.rules is not None else None
        if "report" in req.stages:
            _report(t, s)
        if verdict is not None:  # after the report, so that the alert can link it
            emit_gate_event(verdict, flow_run_id, t.rec.report_uri)
        _match_previous(t)
    if not cfg.quantize.formats:
        why["quantize"] = "no quantize.formats configured"
    if not cfg.sae.hooks:
        why["sae"] = "no sae.hooks configured"
    t.skip_missing(req.stages, why)
    return t.finish()


def _ok(r: StageRecord | None) -> bool:
    return r is not None and r.status in OK


def _ingest(t: AuditTracker, s: Settler, ref: ModelRef, cfg: AuditConfig, data_fp: str) -> IngestOutput | None:
    r = t.stage(
        s.run(ingest_task, "ingest", "ingest", ref=ref, cfg=cfg, dataset_fingerprint=data_fp, store_uri=s.store.uri),
        "dataset",
    )
    if not _ok(r):
        return None
    arch, data = load_outputs(r, s.store)  # read once here; every later task gets them handed down
    ing = IngestOutput(
        model=ref,
        record=r,
        model_digest=r.details["model_digest"],
        dataset_digest=r.details["dataset_digest"],
        modality=r.details.get("modality", "text"),
        architecture=arch,
        dataset=data,
    )
    t.rec.model_digest, t.rec.dataset_digest = ing.model_digest, ing.dataset_digest
    t.rec.architecture, t.rec.dataset = arch, data
    log_lineage(
        t.rec.mlflow_run_id,
        ref.resolved_path or ref.source,
        ing.model_digest,
        str(cfg.dataset.path),
        ing.dataset_digest,
    )
    return ing


def _quantize(t: AuditTracker, s: Settler, ing: IngestOutput) -> dict[str, str]:
    """One task per format (a format added later is the only one computed); returns requested → made."""
    formats = t.config.quantize.formats
    kw = {"ing": ing, "cfg": t.config, "store_uri": s.store.uri}
    ran = s.run_many(
        quantize_task, "quantize", {f"quantize[{f}]": {**kw, "fmt": f} for f in formats}, side_by_side=False
    )
    parts = {f: t.variant(f, r, "quantize") for f, r in zip(formats, ran.values(), strict=True)}
    t.aggregate("quantize", parts)
    return {f: r.details["produced"] for f, r in parts.items() if _ok(r)}


def _trace(t: AuditTracker, s: Settler, ing: IngestOutput, produced: dict[str, str]) -> None:
    """The full-precision model and each variant: in turn here, side by side on pods with deployments."""
    kw = {"ing": ing, "cfg": t.config, "store_uri": s.store.uri}
    variants = produced if t.config.quantize.trace_variants else {}
    calls = {"trace": kw} | {f"trace[{fmt}]": {**kw, "variant": made} for fmt, made in variants.items()}
    ran = s.run_many(trace_task, "trace", calls, side_by_side=False)
    t.stage(ran["trace"], "trace")
    for fmt in variants:
        t.variant(fmt, ran[f"trace[{fmt}]"], "trace")


def _variant_traces(t: AuditTracker) -> dict[str, StageRecord]:
    return {f: v["trace"] for f, v in t.rec.variants.items() if _ok(v.get("trace"))}


def _sae(t: AuditTracker, s: Settler, ing: IngestOutput) -> None:
    hooks = t.config.sae.hooks
    groups = [hooks] if t.config.sae.joint else [[h] for h in hooks]
    kw = {"ing": ing, "trace": t.rec.stages["trace"], "cfg": t.config, "store_uri": s.store.uri}
    calls = {f"sae[{','.join(g)}]": {**kw, "hooks": g, "variant_traces": _variant_traces(t)} for g in groups}
    # one run per SAE (joint: one pass for all): in turn here, side by side on pods with deployments
    ran = s.run_many(sae_task, "sae", calls, side_by_side=False)
    for group, results in zip(groups, ran.values(), strict=True):
        for hook in group:
            r = t.sae(hook, results[hook] if isinstance(results, dict) else results)
            if _ok(r):
                log_curves(r.mlflow_run_id, f"{r.details['prefix']}/curves.json", s.store.uri)
    t.aggregate("sae", t.rec.saes)


def _metrics(t: AuditTracker, s: Settler, ing: IngestOutput) -> None:
    kw = {"ing": ing, "cfg": t.config, "store_uri": s.store.uri}
    shards = s.run_many(
        weights_task, "metrics", {f"weights-{i}": {**kw, "shard": i} for i in range(t.config.metrics.weight_shards)}
    )
    bad = next((r for r in shards.values() if not _ok(r)), None)
    try:
        compare = _compare_traces(s.store, t.config.metrics.compare_audits)
    except InputError as exc:
        compare, bad = {}, s.failed("metrics", "metrics", exc)
    if bad is None:
        trace = t.rec.stages.get("trace")
        bad = s.run(
            metrics_task, "metrics", "metrics", **kw, shards=list(shards.values()),
            trace=trace if _ok(trace) else None, variant_traces=_variant_traces(t), compare=compare,
        )  # fmt: skip
    m = t.stage(bad, "metrics")
    if _ok(m):
        log_layer_metrics(m.mlflow_run_id, m.details["weights"])


def _index(t: AuditTracker, ing: IngestOutput) -> None:
    """Layers and SAE features into Qdrant; a failure here is a warning, not a failed audit."""
    m = t.rec.stages.get("metrics")
    saes = {h: r for h, r in t.rec.saes.items() if _ok(r)}
    if not _ok(m) and not saes:
        return
    state = index_task(t.rec.audit_id, ing.model_digest, m if _ok(m) else None, saes, t.store.uri, return_state=True)
    if not state.is_completed():
        get_run_logger().warning("Qdrant indexing failed: %s", state.result(raise_on_failure=False))


def _robustness(t: AuditTracker, s: Settler, ing: IngestOutput, produced: dict[str, str]) -> None:
    kw = {"ing": ing, "cfg": t.config, "store_uri": s.store.uri}
    saes = {h: r for h, r in t.rec.saes.items() if _ok(r)}
    variants = produced if t.config.robustness.variants else {}
    calls = {"robustness": {**kw, "variant": FP, "saes": saes}}
    calls |= {f"robustness[{fmt}]": {**kw, "variant": made} for fmt, made in variants.items()}
    ran = s.run_many(robustness_task, "robustness", calls, side_by_side=False)
    fp = t.stage(ran["robustness"], "robustness")
    parts = {FP: fp} | {fmt: t.variant(fmt, ran[f"robustness[{fmt}]"], "robustness") for fmt in variants}
    for r in parts.values():
        if _ok(r):
            log_eps_curves(r.mlflow_run_id, r.details["curves"])
    _mark_variants(t, "robustness", parts)


def _reliability(t: AuditTracker, s: Settler, ing: IngestOutput, produced: dict[str, str]) -> None:
    """The full-precision model first: a variant's corruption errors are relative to its results."""
    kw = {"ing": ing, "cfg": t.config, "store_uri": s.store.uri}
    fp = t.stage(s.run(reliability_task, "reliability", "reliability", **kw, variant=FP), "reliability")
    variants = produced if t.config.reliability.variants else {}
    calls = {
        f"reliability[{fmt}]": {**kw, "variant": made, "baseline": fp if _ok(fp) else None}
        for fmt, made in variants.items()
    }
    ran = s.run_many(reliability_task, "reliability", calls, side_by_side=False) if calls else {}
    parts = {FP: fp} | {fmt: t.variant(fmt, ran[f"reliability[{fmt}]"], "reliability") for fmt in variants}
    for r in parts.values():
        if _ok(r) and r.mlflow_run_id:
            log_reliability(r.mlflow_run_id, r.details)
    _mark_variants(t, "reliability", parts)


PER_VARIANT_TASKS = {"landscape": landscape_task, "attribution": attribution_task}


def _per_variant(t: AuditTracker, s: Settler, ing: IngestOutput, stage: str, variants: dict[str, str]) -> None:
    """A stage of the full-precision model and of each variant asked (format -> the format produced), one after
    another (each holds a model and its gradients)."""
    kw = {"ing": ing, "cfg": t.config, "store_uri": s.store.uri}
    calls = {stage: {**kw, "variant": FP}} | {
        f"{stage}[{fmt}]": {**kw, "variant": made} for fmt, made in variants.items()
    }
    ran = s.run_many(PER_VARIANT_TASKS[stage], stage, calls, side_by_side=False)
    parts = {FP: t.stage(ran[stage], stage)}
    parts |= {fmt: t.variant(fmt, ran[f"{stage}[{fmt}]"], stage) for fmt in variants}
    _mark_variants(t, stage, parts)


def _mark_variants(t: AuditTracker, stage: str, parts: dict[str, StageRecord]) -> None:
    """A stage run on fp and each variant: where some failed, the fp results stay the stage's record, marked
    with how the variants went (partial, their errors)."""
    if len(parts) > 1 and any(not _ok(r) for r in parts.values()):
        agg = t.aggregate(stage, parts)
        if _ok(parts[FP]):
            t.rec.stages[stage] = parts[FP].model_copy(update={"status": agg.status, "error": agg.error})


def _report(t: AuditTracker, s: Settler) -> None:
    done = {k: v for k, v in t.rec.stages.items() if v.status != StageStatus.skipped}
    kw = {"stages": done, "variants": t.rec.variants, "saes": t.rec.saes, "cfg": t.config, "store_uri": s.store.uri}
    r = t.stage(s.run(report_task, "report", "report", **kw), "report")
    if _ok(r):
        t.rec.report_uri = r.artifacts["report"]


def _match_previous(t: AuditTracker) -> None:
    """SAE features matched against the run's previous checkpoint, stored under matches/ before the audit
    ends (the viewer reads them); a failure here is one log line, never a failed audit."""
    if not t.rec.saes:
        return
    log = get_run_logger()
    try:
        outcomes = match_run_previous(t.store, t.rec)
    except Exception as exc:  # noqa: BLE001 -- matching is a bonus on top of the audit
        log.warning("feature matching failed: %s", one_line(exc))
        return
    for o in outcomes:
        if o.matches is not None:
            log.info("features matched %s → %s: %s", o.audit_a, o.audit_b, describe(o.matches))
        else:
            log.info("features on %s not matched: %s", o.hook, o.reason)


def _compare_traces(store: ArtifactStore, audit_ids: list[str]) -> dict[str, StageRecord]:
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
