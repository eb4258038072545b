from __future__ import annotations

from typing import Any

from microscope.stages import quantize
from prefect import task
from schemas.config import AuditConfig
from schemas.records import StageRecord
from schemas.stages import IngestOutput

from tasks.common import cache_key, stage_inputs, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    ing: IngestOutput = p["ing"]
    return cache_key(
        "quantize",
        model=ing.model_digest,
        config=quantize.config_hash(p["cfg"], p["fmt"], ing.dataset_digest),
        store=p["store_uri"],
    )


@task(cache_key_fn=_key, task_run_name="quantize-{fmt}", **stage_options("quantize"))
def quantize_task(ing: IngestOutput, fmt: str, cfg: AuditConfig, store_uri: str) -> StageRecord:
    """One quantized variant: produced (with OOM fallback), measured, compared with full precision, saved."""
    return quantize.run(stage_inputs(ing, cfg, store_uri), fmt)
