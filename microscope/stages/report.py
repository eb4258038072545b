"""report: render the HTML report from the stage records and store it."""

from __future__ import annotations

from typing import Any

from schemas.config import AuditConfig, canonical_hash
from schemas.details import ReportDetails, ingest_details
from schemas.records import StageRecord, StageStatus

from microscope import report
from microscope.stages.ingest import load_outputs
from microscope.stages.runner import StageRun, run_stage, stage_prefix
from microscope.store import ArtifactStore

# 4: template file, matplotlib charts, undefined figures with their reasons; 5: every header from the glossary
VERSION = "5"


def config_hash(
    cfg: AuditConfig,
    stages: dict[str, StageRecord],
    variants: dict[str, dict[str, StageRecord]] | None = None,
    saes: dict[str, StageRecord] | None = None,
) -> str:
    # A cached stage holds the same results as the run that computed it: hash it as completed.
    def key(r: StageRecord) -> list[Any]:
        return [r.status == StageStatus.failed, r.config_hash, r.error]

    inputs = {name: key(r) for name, r in sorted(stages.items())}
    per_variant = {v: {s: key(r) for s, r in sorted(recs.items())} for v, recs in sorted((variants or {}).items())}
    per_sae = {h: key(r) for h, r in sorted((saes or {}).items())}
    return canonical_hash(
        {"v": VERSION, "report": cfg.report.model_dump(), "inputs": inputs, "variants": per_variant, "saes": per_sae}
    )


def run(
    stages: dict[str, StageRecord],
    cfg: AuditConfig,
    store: ArtifactStore,
    variants: dict[str, dict[str, StageRecord]] | None = None,
    saes: dict[str, StageRecord] | None = None,
) -> StageRecord:
    ingest = stages["ingest"]
    chash = config_hash(cfg, stages, variants, saes)
    prefix = stage_prefix(ingest_details(ingest).model_digest, "report", chash)

    def compute(run: StageRun) -> StageRecord:
        arch, data = load_outputs(ingest, store)
        html = report.render(stages, arch, data, cfg.report.title, cfg.report.max_modules, variants, saes)
        uri = store.put_bytes(run.key("report.html"), html.encode())
        return run.record(
            input_digests={name: r.config_hash or "" for name, r in stages.items()},
            artifacts={"report": uri},
            metrics={"bytes": float(len(html))},
            details=ReportDetails(prefix=run.prefix, report_key=run.key("report.html")),
        )

    return run_stage(store, "report", prefix, chash, compute)
