from __future__ import annotations

from typing import Any

from microscope.stages import ingest as ingest_stage
from microscope.stages import robustness
from microscope.store import open_store
from prefect import task
from schemas.config import AuditConfig
from schemas.records import ModelRef, StageRecord

from tasks.common import Progress, cache_key, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    ing: StageRecord = p["ingest"]
    saes = {h: r.config_hash or "" for h, r in (p.get("saes") or {}).items()} if p["variant"] == "fp" else {}
    return cache_key(
        "robustness",
        model=ing.details["model_digest"],
        config=robustness.config_hash(p["cfg"], ing.details["dataset_digest"], p["variant"], saes),
        store=p["store_uri"],
    )


@task(cache_key_fn=_key, task_run_name="robustness-{variant}", **stage_options("robustness"))
def robustness_task(
    ref: ModelRef,
    ingest: StageRecord,
    cfg: AuditConfig,
    store_uri: str,
    variant: str = "fp",
    saes: dict[str, StageRecord] | None = None,
) -> StageRecord:
    """AutoAttack per norm and the PGD/FGSM/noise sweeps on one variant (fp or a quantized format)."""
    store = open_store(store_uri)
    arch, _ = ingest_stage.load_outputs(ingest, store)
    progress = Progress(f"robustness {variant}: attacks", key="robustness-progress", unit="attack")
    try:
        return robustness.run(ref, ingest, arch, cfg, store, variant, saes, progress)
    finally:
        progress.close()
