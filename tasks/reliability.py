from __future__ import annotations

from typing import Any

from microscope.stages import reliability
from prefect import task
from schemas.config import AuditConfig
from schemas.records import StageRecord
from schemas.stages import IngestOutput

from tasks.common import cache_key, stage_inputs, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    ing: IngestOutput = p["ing"]
    base = p.get("baseline")
    return cache_key(
        "reliability",
        model=ing.model_digest,
        config=reliability.config_hash(
            p["cfg"], ing.dataset_digest, p["variant"], base.config_hash or "" if base else ""
        ),
        store=p["store_uri"],
    )


@task(cache_key_fn=_key, task_run_name="reliability-{variant}", **stage_options("reliability"))
def reliability_task(
    ing: IngestOutput, cfg: AuditConfig, store_uri: str, variant: str = "fp", baseline: StageRecord | None = None
) -> StageRecord:
    """Calibration, OOD detection and (images) common corruptions of one variant (fp or a quantized format)."""
    return reliability.run(stage_inputs(ing, cfg, store_uri), variant, baseline)
