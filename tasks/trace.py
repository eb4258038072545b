from __future__ import annotations

from typing import Any

from microscope.stages import trace
from prefect import task
from schemas.config import AuditConfig
from schemas.records import StageRecord
from schemas.stages import IngestOutput

from tasks.common import Progress, cache_key, stage_inputs, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    ing: IngestOutput = p["ing"]
    return cache_key(
        "trace",
        model=ing.model_digest,
        config=trace.config_hash(p["cfg"], ing.dataset_digest, p.get("variant") or "fp"),
        quantize=p["cfg"].quantize.model_dump(exclude={"formats", "trace_variants"}) if p.get("variant") else None,
        store=p["store_uri"],
    )


@task(cache_key_fn=_key, task_run_name="trace-{variant}", **stage_options("trace"))
def trace_task(ing: IngestOutput, cfg: AuditConfig, store_uri: str, variant: str | None = None) -> StageRecord:
    """Activations at the configured hook points (of the full model or a quantized variant), to Parquet."""
    progress = Progress(f"trace {variant or 'fp'}: windows through the model", key="trace-progress")
    try:
        return trace.run(stage_inputs(ing, cfg, store_uri), progress, variant)
    finally:
        progress.close()
