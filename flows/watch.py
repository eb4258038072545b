"""The `watch` flow: audit every checkpoint under a prefix that has not been audited yet.

Run on a schedule (deployments/prefect.yaml), it lists the prefix and starts one flow run of the audit
deployment per checkpoint with an idempotency key made of the checkpoint's content digest and its URI:
the Prefect server is the one place that remembers what was started, so a second tick, a second watcher
or a restarted one starts nothing twice, and a checkpoint rewritten with new bytes is audited again (a
copy of the same bytes under another name gets its own audit, whose stages are all cache hits).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from microscope.checkpoints import find_checkpoints
from schemas.config import canonical_hash


@flow(name="watch", validate_parameters=True)
def watch(
    prefix: str,
    run_id: str | None = None,
    dataset: str | None = None,
    config: str | dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    deployment: str = "audit/checkpoint",
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Start audits (flow runs of `deployment`) of the checkpoints under `prefix` (folder or s3://);
    `run_id` defaults to the prefix's last path component. At most `limit` new audits per call."""
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    log = get_run_logger()
    run = run_id or prefix.rstrip("/").rsplit("/", 1)[-1]
    started_at = flow_run.scheduled_start_time
    out: list[dict[str, Any]] = []
    new = 0
    for ckpt in find_checkpoints(prefix):
        if limit is not None and new >= limit:
            log.info("limit of %d new audits reached; the rest wait for the next tick", limit)
            break
        params = {"model": ckpt.uri, "dataset": dataset, "config": config, "run_id": run, "step": ckpt.step}
        fr = run_deployment(
            deployment,
            parameters=params | ({"tags": tags} if tags else {}),
            idempotency_key=f"microscope-watch-{canonical_hash([ckpt.uri, ckpt.digest], length=32)}",
            timeout=0,
            as_subflow=False,
        )
        fresh = started_at is None or fr.created is None or fr.created >= started_at
        new += fresh
        log.info("%s: %s (flow run %s)", ckpt.uri, "audit started" if fresh else "already audited", fr.name)
        out.append({"checkpoint": ckpt.uri, "step": ckpt.step, "flow_run_id": str(fr.id), "new": fresh})
    log.info("%d checkpoint(s) under %s, %d new audit(s)", len(out), prefix, new)
    return out
