"""One function per stage: load inputs, call the mathematics, write artifacts, return a StageRecord.

Each checks its manifest first, so the same inputs on another machine (same store) find the finished
artifacts instead of recomputing them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from schemas.records import StageRecord, StageStatus


def stage_prefix(model_digest: str, stage: str, config_hash: str) -> str:
    return f"{model_digest[:16]}/{stage}/{config_hash}"


def from_manifest(manifest: dict[str, Any]) -> StageRecord:
    """A record rebuilt from a finished stage's manifest, marked cached."""
    rec = StageRecord.model_validate(manifest["record"])
    return rec.model_copy(update={"status": StageStatus.cached})


@contextmanager
def timed(record: dict[str, Any]) -> Iterator[None]:
    record["started_at"] = datetime.now(UTC)
    t0 = time.perf_counter()
    yield
    record["seconds"] = time.perf_counter() - t0
    record["finished_at"] = datetime.now(UTC)
