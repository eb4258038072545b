"""What every stage task shares: cache keys from digests, retry policy, progress reporting."""

from __future__ import annotations

import sys
import time
from typing import Any

from microscope import __version__
from microscope.errors import is_retryable
from microscope.stages.inputs import StageInputs
from microscope.store import open_store
from prefect.tasks import exponential_backoff
from schemas.config import AuditConfig, canonical_hash
from schemas.stages import IngestOutput

RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=2)  # 2 s, 4 s, 8 s


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O and network failures; a validation or input error fails at once."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_retryable(exc)


def stage_inputs(ing: IngestOutput, cfg: AuditConfig, store_uri: str) -> StageInputs:
    """What a stage after ingest starts from, with the store opened in this task's process."""
    return StageInputs.of(ing, cfg, open_store(store_uri))


def cache_key(stage: str, **material: Any) -> str:
    """`stage-<hash>` over input digests, the stage's config hash, the store and the code version."""
    return f"{stage}-{canonical_hash({'microscope': __version__, **material}, length=32)}"


def stage_options(stage: str, timeout_s: float | None = None) -> dict[str, Any]:
    return {
        "name": stage,
        "persist_result": True,
        "result_serializer": "json",
        "retries": RETRIES,
        "retry_delay_seconds": RETRY_DELAYS,
        "retry_condition_fn": retry_transient,
        "timeout_seconds": timeout_s,
    }


def on_terminal() -> bool:
    """Progress bars only where someone watches: a log file or CI gets one line per stage instead."""
    return sys.stderr.isatty()


class Progress:
    """Progress to the terminal (tqdm on stderr, only on a terminal) and to the Prefect UI (a progress
    artifact)."""

    def __init__(self, description: str, key: str | None = None, min_interval_s: float = 1.0, unit: str = "win"):
        from prefect.artifacts import create_progress_artifact
        from tqdm import tqdm

        self.artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)
        self.bar = tqdm(
            desc=description, file=sys.stderr, unit=unit, leave=False, dynamic_ncols=True, disable=not on_terminal()
        )
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        from prefect.artifacts import update_progress_artifact

        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()
        now = time.monotonic()
        if now - self._last >= self.min_interval_s or done >= total:
            self._last = now
            update_progress_artifact(artifact_id=self.artifact_id, progress=100.0 * done / max(total, 1))

    def close(self) -> None:
        self.bar.close()
