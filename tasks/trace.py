from __future__ import annotations

from typing import Any

from microscope.stages import ingest as ingest_stage
from microscope.stages import trace
from microscope.store import open_store
from prefect import task
from schemas.config import AuditConfig
from schemas.records import ModelRef, StageRecord

from tasks.common import Progress, cache_key, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    ing: StageRecord = p["ingest"]
    return cache_key(
        "trace",
        model=ing.details["model_digest"],
        config=trace.config_hash(p["cfg"], ing.details["dataset_digest"], p.get("variant") or "fp"),
        quantize=p["cfg"].quantize.model_dump(exclude={"formats", "trace_variants"}) if p.get("variant") else None,
        store=p["store_uri"],
    )


@task(cache_key_fn=_key, **stage_options("trace"))
def trace_task(
    ref: ModelRef, ingest: StageRecord, cfg: AuditConfig, store_uri: str, variant: str | None = None
) -> StageRecord:
    """Activations at the configured hook points (of the full model or a quantized variant), to Parquet."""
    store = open_store(store_uri)
    arch, _ = ingest_stage.load_outputs(ingest, store)
    progress = Progress(f"trace {variant or 'fp'}: windows through the model", key="trace-progress")
    try:
        return trace.run(ref, ingest, arch, cfg, store, progress, variant)
    finally:
        progress.close()
