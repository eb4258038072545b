"""Prefect behaviour we rely on, against the real local server: retries for transient errors only,
and the CLI starting quickly without importing the heavy stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from microscope.errors import InputError, TransientError, is_retryable


def test_is_retryable_classification() -> None:
    assert is_retryable(TransientError("S3 timed out"))
    assert is_retryable(ConnectionError("reset"))
    assert is_retryable(OSError(5, "I/O error"))
    assert not is_retryable(InputError("bad config"))
    assert not is_retryable(ValueError("validation"))
    assert not is_retryable(FileNotFoundError("gone"))


def test_transient_errors_retry_and_input_errors_do_not(prefect_api: str, tmp_path: Path) -> None:
    """Run in a subprocess so its Prefect settings point at the shared server."""
    script = tmp_path / "retry_flow.py"
    script.write_text(
        """
import json
from prefect import flow, task
from microscope.errors import InputError, TransientError
from tasks.common import stage_options

calls = {"flaky": 0, "bad": 0}

def opts(name):
    o = stage_options(name)
    o.update(retry_delay_seconds=0, persist_result=False)
    return o

@task(cache_policy=None, **{k: v for k, v in opts("flaky").items()})
def flaky():
    calls["flaky"] += 1
    if calls["flaky"] < 3:
        raise TransientError("network blip")
    return "ok"

@task(cache_policy=None, **{k: v for k, v in opts("bad").items()})
def bad():
    calls["bad"] += 1
    raise InputError("dataset.seq_len is wrong")

@flow
def f():
    a = flaky(return_state=True)
    b = bad(return_state=True)
    return {"flaky": [a.name, calls["flaky"]], "bad": [b.name, calls["bad"]]}

print(json.dumps(f()))
"""
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(tmp_path / "ph"),
        "PREFECT_LOGGING_LEVEL": "ERROR",
    }
    out = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["flaky"] == ["Completed", 3]  # two retries, then success
    assert result["bad"] == ["Failed", 1]  # never retried


def test_cli_help_imports_nothing_heavy() -> None:
    code = (
        "import sys, flows.cli as c\n"
        "c.build_parser().format_help()\n"
        "heavy = [m for m in ('torch', 'prefect', 'mlflow', 'transformers', 'pyarrow', 'great_expectations') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("which", ["config", "audit"])
def test_schema_command(which: str, tmp_path: Path) -> None:
    import json

    out = subprocess.run(
        [str(Path(sys.executable).parent / "microscope"), "schema", which], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert "properties" in schema and ("trace" in schema["properties"] or "stages" in schema["properties"])
