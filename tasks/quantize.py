from __future__ import annotations

from typing import Any

from microscope.stages import ingest as ingest_stage
from microscope.stages import quantize
from microscope.store import open_store
from prefect import task
from schemas.config import AuditConfig
from schemas.records import ModelRef, StageRecord

from tasks.common import cache_key, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    ing: StageRecord = p["ingest"]
    return cache_key(
        "quantize",
        model=ing.details["model_digest"],
        config=quantize.config_hash(p["cfg"], p["fmt"], ing.details["dataset_digest"]),
        store=p["store_uri"],
    )


@task(cache_key_fn=_key, task_run_name="quantize-{fmt}", **stage_options("quantize"))
def quantize_task(ref: ModelRef, ingest: StageRecord, fmt: str, cfg: AuditConfig, store_uri: str) -> StageRecord:
    """One quantized variant: produced (with OOM fallback), measured, compared with full precision, saved."""
    store = open_store(store_uri)
    arch, _ = ingest_stage.load_outputs(ingest, store)
    return quantize.run(ref, ingest, arch, fmt, cfg, store)
