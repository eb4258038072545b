from __future__ import annotations

from typing import Any

from microscope.stages import landscape
from prefect import task
from schemas.config import AuditConfig
from schemas.records import StageRecord
from schemas.stages import IngestOutput

from tasks.common import cache_key, stage_inputs, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    ing: IngestOutput = p["ing"]
    chash = landscape.config_hash(p["cfg"], ing.dataset_digest, p["variant"])
    return cache_key("landscape", model=ing.model_digest, config=chash, store=p["store_uri"])


@task(cache_key_fn=_key, task_run_name="landscape-{variant}", **stage_options("landscape"))
def landscape_task(ing: IngestOutput, cfg: AuditConfig, store_uri: str, variant: str = "fp") -> StageRecord:
    """Loss curvature (top Hessian eigenvalues), 1-D and 2-D loss slices and sharpness of one variant (fp or a format)."""
    return landscape.run(stage_inputs(ing, cfg, store_uri), variant)
