"""What a console (or a log file, or CI) shows of an audit: one line per stage start and end, the
summary, and real warnings. Prefect's engine lines (task-run states, the runner's polling) and libraries'
chatter still reach the Prefect UI through its API handler; `microscope -v` shows them here too.

`flows/logging.yml` (Prefect's own config plus this filter on the console handler) is installed through
PREFECT_LOGGING_SETTINGS_PATH, so it also governs the subprocesses a served deployment starts.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

LOGGING_YML = Path(__file__).with_name("logging.yml")
# the flow engine's own lines about the audit flow run (its states are in the UI)
ENGINE = ("Finished in state", "Beginning flow run", "Created flow run", "View at ", "Running on ")


class StageLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not msg.strip():
            return False
        if record.levelno >= logging.WARNING:
            return True
        if record.name == "prefect.flow_runs":  # ours come through the flow run's logger
            return not msg.startswith(ENGINE)
        return record.name.startswith("microscope")


class _OptionalKernel(logging.Filter):
    """bitsandbytes warns on import, on CPUs with AVX-512 BF16, that its optional `kernels` hub package is
    missing; the 4-bit layers run as dequantize + matmul here (microscope/quant4bit.py), so it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


def quiet_console(verbose: bool) -> None:
    """Install the quiet console for this process and the processes it starts (before prefect is imported)."""
    if verbose:
        return
    os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(LOGGING_YML))
    # libraries' deprecation notes are not the user's business (here and in the processes started from here)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.simplefilter("ignore")
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernel())
