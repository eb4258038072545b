from __future__ import annotations

from typing import Any

from microscope.stages import report
from microscope.store import open_store
from prefect import task
from schemas.config import AuditConfig
from schemas.records import StageRecord

from tasks.common import cache_key, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    return cache_key(
        "report",
        config=report.config_hash(p["cfg"], p["stages"], p.get("variants"), p.get("saes")),
        store=p["store_uri"],
    )


@task(cache_key_fn=_key, **stage_options("report"))
def report_task(
    stages: dict[str, StageRecord],
    cfg: AuditConfig,
    store_uri: str,
    variants: dict[str, dict[str, StageRecord]] | None = None,
    saes: dict[str, StageRecord] | None = None,
) -> StageRecord:
    """Render the HTML report from whatever stage records exist."""
    return report.run(stages, cfg, open_store(store_uri), variants, saes)
