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
    from prefect import get_client, get_run_logger
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
    states: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        while len(states) < len(runs):
            for label, fr in runs.items():
                if label not in states:
                    state = client.read_flow_run(fr.id).state
                    if state is not None and state.is_final():
                        states[label] = state
            if len(states) < len(runs):
                time.sleep(POLL_S)
    return {label: states[label] for label in runs}


def get_settings_api() -> str:
    """The Prefect API this process talks to, for error messages."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "Prefect's temporary local server"
