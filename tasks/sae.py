from __future__ import annotations

from typing import Any

from microscope.stages import sae
from prefect import task
from schemas.config import AuditConfig
from schemas.records import StageRecord
from schemas.stages import IngestOutput

from tasks.common import cache_key, on_terminal, stage_inputs, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    variants = {k: v.config_hash for k, v in sorted((p.get("variant_traces") or {}).items())}
    return cache_key(
        "sae",
        model=p["ing"].model_digest,
        config=[sae.config_hash(p["cfg"], h, p["trace"].config_hash or "") for h in p["hooks"]],
        variants=variants,
        store=p["store_uri"],
    )


@task(cache_key_fn=_key, task_run_name="sae-{hooks}", **stage_options("sae"))
def sae_task(
    ing: IngestOutput,
    trace: StageRecord,
    hooks: list[str],
    cfg: AuditConfig,
    store_uri: str,
    variant_traces: dict[str, StageRecord] | None = None,
) -> dict[str, StageRecord]:
    """Train, evaluate and save the SAEs of `hooks` (one pass over their data); extract their features."""
    return sae.run_many(stage_inputs(ing, cfg, store_uri), trace, hooks, variant_traces, progress=on_terminal())
