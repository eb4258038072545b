"""The Kubernetes work-pool base job templates (`pools/gpu.json`, `pools/cpu.json`) and their overrides.

`load_template("gpu", {"gpu_count": 4})` returns the GPU pool's base job template with the variable's default
set to 4, checked against the variable's JSON schema, ready for `prefect work-pool create --base-job-template`
or `PrefectClient.create_work_pool`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema

POOLS: dict[str, str] = {"gpu": "microscope-gpu", "cpu": "microscope-cpu"}
POOLS_DIR = Path(__file__).resolve().parent / "pools"


def load_template(kind: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The base job template of pool `kind` ("gpu" or "cpu"), with `overrides` as the variables' defaults.

    Raises ValueError for an unknown kind, an unknown variable name (naming the valid ones) or a value that
    does not match the variable's JSON schema (naming the variable and the expected schema).
    """
    if kind not in POOLS:
        raise ValueError(f"unknown pool kind {kind!r}: use one of {sorted(POOLS)}")
    template: dict[str, Any] = json.loads((POOLS_DIR / f"{kind}.json").read_text())
    variables = template["variables"]
    properties: dict[str, dict[str, Any]] = variables["properties"]
    for name, value in (overrides or {}).items():
        if name not in properties:
            raise ValueError(
                f"{POOLS[kind]} has no job variable {name!r}; valid variables: {', '.join(sorted(properties))}"
            )
        # The property's schema, with the template's definitions so `$ref`s (cluster_config) resolve.
        schema = {**properties[name], "definitions": variables.get("definitions", {})}
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            raise ValueError(f"{POOLS[kind]} job variable {name!r}: {exc.message}") from exc
        properties[name]["default"] = copy.deepcopy(value)
    return template
