"""The audit being built: its record, its MLflow runs and its log, one line per stage."""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from microscope import audits, tracking
from microscope.store import ArtifactStore
from schemas.config import STAGES, AuditConfig
from schemas.records import AuditRecord, ModelRef, StageRecord, StageStatus
from schemas.stages import AuditRequest
from tasks.tracking import finish_run, log_stage, start_run

OK = (StageStatus.completed, StageStatus.cached)


def summary_line(label: str, r: StageRecord) -> str:
    """`trace[int8]: completed in 12.3 s (tokens_per_s=1.2e+03, datasets=3)`: what a log needs of a stage."""
    secs = f" in {r.seconds:.1f} s" if r.seconds is not None and r.status == StageStatus.completed else ""
    figs = ", ".join(f"{k}={v:.4g}" for k, v in list(r.metrics.items())[:4])
    undefined = f"; undefined: {', '.join(r.undefined)}" if r.undefined else ""
    tail = f" ({figs}{undefined})" if figs or undefined else ""
    return f"{label}: {r.status.value}{secs}{tail}" + (f" — {r.error}" if r.error else "")


class AuditTracker:
    def __init__(self, req: AuditRequest, config: AuditConfig, model: ModelRef, store: ArtifactStore, flow_run_id: str):
        self.store = store
        self.config = config
        self.rec = AuditRecord(
            audit_id=req.audit_id,
            run_id=req.run_id,
            step=req.step,
            tags=req.tags,
            created_at=datetime.now(UTC),
            status=StageStatus.completed,
            model=model,
            dataset_source=config.dataset.path,
            config=config.model_dump(mode="json"),
            store_uri=store.uri,
            prefect_flow_run_id=flow_run_id,
            mlflow_tracking_uri=tracking.mlflow_tracking_uri(),
        )
        self.tags = {"prefect.flow_run_id": flow_run_id, "microscope.audit_id": req.audit_id}
        self.tags |= {f"microscope.tag.{k}": v for k, v in req.tags.items()}
        if req.run_id is not None:
            self.tags |= {"microscope.run_id": req.run_id, "microscope.step": str(req.step)}
        self.rec.mlflow_run_id = start_run(req.audit_id, self.tags, self.rec.config)
        # the record is saved only at the end: until then this marker tells later audits of the run (their
        # gates) that this step is on its way
        audits.mark_started(store, self.rec)

    def _log(self, r: StageRecord, section: str, extra_tags: dict[str, str], label: str) -> StageRecord:
        tags = {**self.tags, "microscope.model_digest": self.rec.model_digest or "", **extra_tags}
        cfg = getattr(self.config, section).model_dump(mode="json") if section else {}
        r.mlflow_run_id = log_stage(self.rec.mlflow_run_id, r, cfg, tags)
        get_run_logger().info("%s", summary_line(label, r))
        return r

    def stage(self, r: StageRecord, section: str) -> StageRecord:
        self.rec.stages[r.stage] = r
        return self._log(r, section, {}, r.stage)

    def variant(self, fmt: str, r: StageRecord, section: str) -> StageRecord:
        r.variant = fmt
        self.rec.variants.setdefault(fmt, {})[r.stage] = r
        return self._log(r, section, {"microscope.variant": fmt}, f"{r.stage}[{fmt}]")

    def sae(self, hook: str, r: StageRecord) -> StageRecord:
        self.rec.saes[hook] = r
        return self._log(r, "sae", {"microscope.hook": hook}, f"sae[{hook}]")

    def aggregate(self, stage: str, parts: dict[str, StageRecord]) -> StageRecord:
        """One record for a stage run per variant or hook: partial when some parts failed and others did
        not (each failure's reason is kept), failed when all did, cached when all were."""
        statuses = {r.status for r in parts.values()}
        failed = {name: r for name, r in parts.items() if r.status == StageStatus.failed}
        if failed and len(failed) == len(parts):
            status = StageStatus.failed
        elif failed:
            status = StageStatus.partial
        else:
            status = StageStatus.cached if statuses == {StageStatus.cached} else StageStatus.completed
        rec = StageRecord(
            stage=stage,
            status=status,
            metrics={"succeeded": float(len(parts) - len(failed)), "failed": float(len(failed))},
            details={
                "parts": {n: r.status.value for n, r in parts.items()},
                "reasons": {n: r.error for n, r in failed.items()},
            },
            error="; ".join(r.error or "" for r in failed.values()) or None,
            seconds=sum(r.seconds or 0.0 for r in parts.values()),
        )
        self.rec.stages[stage] = rec
        return rec

    def skip_missing(self, selected: list[str], why: dict[str, str]) -> None:
        for s in STAGES:
            if s not in self.rec.stages:
                reason = "not requested" if s not in selected else why.get(s, "an earlier stage failed")
                self.rec.stages[s] = StageRecord(stage=s, status=StageStatus.skipped, details={"reason": reason})

    def finish(self) -> AuditRecord:
        rec = self.rec
        bad = [r for r in rec.stages.values() if r.status in (StageStatus.failed, StageStatus.partial)]
        failed = any(r.status == StageStatus.failed for r in bad)
        rec.status = StageStatus.failed if failed else StageStatus.partial if bad else StageStatus.completed
        # errors already start with their label ('ingest: …', 'quantize[nf4]: …'): not 'ingest: ingest: …'
        rec.error = "; ".join(r.error if (r.error or "").startswith(r.stage) else f"{r.stage}: {r.error}" for r in bad)
        rec.error = rec.error or None
        rec.finished_at = datetime.now(UTC)
        audits.save_or_spill(self.store, rec)
        audits.mark_finished(self.store, rec.audit_id)
        report = rec.stages.get("report")
        local = str(self.store.local_path(report.details["report_key"])) if rec.report_uri and report else None
        finish_run(rec.mlflow_run_id, rec, local)
        if rec.report_uri:
            link = rec.report_uri if "://" in rec.report_uri else f"file://{rec.report_uri}"
            create_link_artifact(key="audit-report", link=link, description=f"Report of audit {rec.audit_id}")
        create_markdown_artifact(key="audit-summary", markdown=summary_md(rec), description=f"Audit {rec.audit_id}")
        return rec


def summary_md(rec: AuditRecord) -> str:
    rows = "\n".join(
        f"| {r.stage} | {r.status.value} | {'' if r.seconds is None else f'{r.seconds:.2f}'} | {r.error or ''} |"
        for r in rec.stages.values()
    )
    run = f"Training run `{rec.run_id}`, step {rec.step}.\n\n" if rec.run_id else ""
    return (
        f"# Audit `{rec.audit_id}`\n\n{run}Model digest `{(rec.model_digest or '')[:16]}`, dataset digest "
        f"`{(rec.dataset_digest or '')[:16]}`.\n\n| stage | status | seconds | error |\n|---|---|---|---|\n{rows}\n\n"
        f"Report: {rec.report_uri or '—'}\n\nMLflow run `{rec.mlflow_run_id}` at `{rec.mlflow_tracking_uri}`\n"
    )
