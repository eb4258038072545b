"""Starting stage deployments from the audit flow and waiting for them.

Each call becomes a child flow run of `<stage_flow>/<stage>` (a subflow of the audit in the Prefect
UI), all calls of one batch created first so that per-hook SAEs and weight shards run side by side on
as many pods as the work pool gives; then the batch is awaited together.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic_core import to_jsonable_python

from microscope.errors import InputError
from microscope.settings import get_settings

POLL_S = 2.0


def run_stage_deployments(
    task: str, stage: str, audit_id: str, store_uri: str, calls: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Start one flow run of the stage deployment per call (label → task arguments); return each final
    State. Arguments cross as JSON: records and configs, never tensors."""
    from prefect import get_run_logger
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = f"{get_settings().stage_flow}/{stage}"
    log = get_run_logger()
    runs = {}
    for label, kwargs in calls.items():
        params = {
            "task": task,
            "stage": stage,
            "label": label,
            "audit_id": audit_id,
            "store_uri": store_uri,
            # JSON text, not a mapping: Prefect keeps parameters in a JSON column, and PostgreSQL's jsonb refuses
            # strings holding U+0000 (which tokenizer vocabularies and feature contexts can carry)
            "arguments": json.dumps(to_jsonable_python(kwargs)),
        }
        try:
            runs[label] = run_deployment(name, parameters=params, flow_run_name=f"{audit_id}:{label}", timeout=0)
        except ObjectNotFound:
            raise InputError(
                f"stage deployment {name} is not registered on {get_settings_api()}; run `make deploy` there, "
                "or set MICROSCOPE_EXECUTION=local to run stages in the audit's process"
            ) from None
        log.info("%s: started on %s as flow run %s", label, name, runs[label].name)
    return _await(runs, get_settings().stage_start_timeout_s)


def _await(runs: dict[str, Any], start_timeout_s: float) -> dict[str, Any]:
    """Each run's final state. A run no worker picks up (no worker on its pool, or all busy) is warned about
    once a minute has passed and, after `start_timeout_s`, set Failed: its stage fails naming the pool."""
    from prefect import get_client, get_run_logger
    from prefect.states import Failed, StateType

    log = get_run_logger()
    waiting = {StateType.SCHEDULED, StateType.PENDING}
    t0, warned = time.monotonic(), False
    states: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        while len(states) < len(runs):
            idle = []
            for label, fr in runs.items():
                if label in states:
                    continue
                state = client.read_flow_run(fr.id).state
                if state is not None and state.is_final():
                    states[label] = state
                elif state is None or state.type in waiting:
                    idle.append(label)
            waited = time.monotonic() - t0
            if idle and waited > 60 and not warned:
                warned = True
                pools = sorted({runs[label].work_pool_name or "?" for label in idle})
                log.warning(
                    "%s: not started after %.0f s; is a worker polling %s? (`prefect worker start --pool %s`)",
                    ", ".join(idle), waited, ", ".join(pools), pools[0],
                )  # fmt: skip
            if idle and waited > start_timeout_s:
                for label in idle:
                    pool = runs[label].work_pool_name or "its work pool"
                    why = (
                        f"{label}: no worker started it within {start_timeout_s:.0f} s "
                        f"(MICROSCOPE_STAGE_START_TIMEOUT_S); start one with `prefect worker start --pool {pool}`"
                    )
                    client.set_flow_run_state(runs[label].id, Failed(message=why), force=True)
                    states[label] = Failed(message=why)
            if len(states) < len(runs):
                time.sleep(POLL_S)
    return {label: states[label] for label in runs}


def get_settings_api() -> str:
    """The Prefect API this process talks to, for error messages."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "Prefect's temporary local server"
