"""The stage flow: one stage task run as its own flow run, on the pod of a stage deployment.

With `execution: deployments` the audit flow starts `stage/<name>` deployments (GPU pool: quantize,
trace, sae, robustness; CPU pool: ingest, metrics, report) instead of calling the tasks in-process.
The task, its cache key, retries and artifacts are the same code either way; only plain JSON crosses
the wire (records of store URIs), and the stage's typed arguments are rebuilt here from the task's own
signature. A failed stage ends its flow run Failed with the stage's one-line error, so the Prefect UI
shows it red and the audit flow records the same line it would have recorded locally.
"""

from __future__ import annotations

import json
import typing
from typing import Any

from prefect import flow
from prefect.states import Failed
from pydantic import TypeAdapter

from flows.settle import INPUT_ERROR, Settler
from microscope.store import open_store
from schemas.records import StageRecord, StageStatus
from tasks.attribution import attribution_task
from tasks.ingest import ingest_task
from tasks.landscape import landscape_task
from tasks.metrics import metrics_task, weights_task
from tasks.quantize import quantize_task
from tasks.reliability import reliability_task
from tasks.report import report_task
from tasks.robustness import robustness_task
from tasks.sae import sae_task
from tasks.trace import trace_task

TASKS = {
    t.fn.__name__: t
    for t in (
        ingest_task,
        quantize_task,
        trace_task,
        sae_task,
        weights_task,
        metrics_task,
        landscape_task,
        robustness_task,
        reliability_task,
        attribution_task,
        report_task,
    )
}


def typed_arguments(task: Any, arguments: str) -> dict[str, Any]:
    """The arguments' JSON text back into the task's parameter types (records, configs), checked by pydantic."""
    arguments = json.loads(arguments)
    hints = typing.get_type_hints(task.fn)
    unknown = sorted(set(arguments) - set(hints))
    if unknown:
        raise ValueError(f"{task.fn.__name__} takes no argument(s) {', '.join(unknown)}")
    return {k: TypeAdapter(hints[k]).validate_python(v) for k, v in arguments.items()}


@flow(
    name="stage",
    flow_run_name="{audit_id}:{label}",
    persist_result=True,
    result_serializer="json",
    validate_parameters=True,
)
def stage(
    task: str, stage: str, label: str, audit_id: str, store_uri: str, arguments: str
) -> StageRecord | dict[str, StageRecord]:
    """Run the stage task `task` (a name in TASKS) with `arguments` (JSON text) for audit `audit_id`."""
    if task not in TASKS:
        raise ValueError(f"unknown stage task {task!r}; choose from {', '.join(TASKS)}")
    t = TASKS[task]
    result = Settler(open_store(store_uri), audit_id, dispatch=False).run(
        t, stage, label, **typed_arguments(t, arguments)
    )
    failed = [r for r in (result.values() if isinstance(result, dict) else [result]) if r.status == StageStatus.failed]
    if failed:  # the state's name carries whether it was the user's input, for the CLI's exit code
        input_error = failed[0].details.get("input_error")
        return Failed(message=failed[0].error, name=INPUT_ERROR if input_error else "Failed")  # type: ignore[return-value]
    return result
