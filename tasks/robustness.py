from __future__ import annotations

from typing import Any

from microscope.stages import robustness
from prefect import task
from schemas.config import AuditConfig
from schemas.records import StageRecord
from schemas.stages import IngestOutput

from tasks.common import Progress, cache_key, stage_inputs, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    ing: IngestOutput = p["ing"]
    saes = {h: r.config_hash or "" for h, r in (p.get("saes") or {}).items()} if p["variant"] == "fp" else {}
    return cache_key(
        "robustness",
        model=ing.model_digest,
        config=robustness.config_hash(p["cfg"], ing.dataset_digest, p["variant"], saes),
        store=p["store_uri"],
    )


@task(cache_key_fn=_key, task_run_name="robustness-{variant}", **stage_options("robustness"))
def robustness_task(
    ing: IngestOutput,
    cfg: AuditConfig,
    store_uri: str,
    variant: str = "fp",
    saes: dict[str, StageRecord] | None = None,
) -> StageRecord:
    """AutoAttack per norm and the PGD/FGSM/noise sweeps on one variant (fp or a quantized format)."""
    progress = Progress(f"robustness {variant}: attacks", key="robustness-progress", unit="attack")
    try:
        return robustness.run(stage_inputs(ing, cfg, store_uri), variant, saes, progress)
    finally:
        progress.close()
