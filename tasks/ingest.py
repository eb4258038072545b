from __future__ import annotations

from typing import Any

from microscope.stages import ingest
from microscope.store import open_store
from prefect import task
from schemas.config import AuditConfig
from schemas.records import ModelRef, StageRecord

from tasks.common import cache_key, stage_options


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    cfg: AuditConfig = p["cfg"]
    return cache_key(
        "ingest",
        v=ingest.VERSION,
        model_files=p["ref"].source_fingerprint,
        dataset_file=p["dataset_fingerprint"],
        dataset=cfg.dataset.model_dump(exclude={"path"}),
        tokenizer=p["ref"].tokenizer,
        store=p["store_uri"],
    )


@task(cache_key_fn=_key, **stage_options("ingest"))
def ingest_task(ref: ModelRef, cfg: AuditConfig, dataset_fingerprint: str, store_uri: str) -> StageRecord:
    """Load, digest and describe the model; read, validate and pack the dataset."""
    return ingest.run(ref, cfg, open_store(store_uri))
