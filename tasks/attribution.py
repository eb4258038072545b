from __future__ import annotations

from typing import Any

from microscope.stages import attribution
from prefect import task
from schemas.config import AuditConfig
from schemas.records import StageRecord
from schemas.stages import IngestOutput

from tasks.common import cache_key, stage_inputs, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    ing: IngestOutput = p["ing"]
    chash = attribution.config_hash(p["cfg"], ing.dataset_digest, p["variant"])
    return cache_key("attribution", model=ing.model_digest, config=chash, store=p["store_uri"])


@task(cache_key_fn=_key, task_run_name="attribution-{variant}", **stage_options("attribution"))
def attribution_task(ing: IngestOutput, cfg: AuditConfig, store_uri: str, variant: str = "fp") -> StageRecord:
    """Saliency, Integrated Gradients, SmoothGrad, per-block shares and the randomisation check of one variant."""
    return attribution.run(stage_inputs(ing, cfg, store_uri), variant)
