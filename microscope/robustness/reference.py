"""The reference AutoAttack (pyautoattack, Croce & Hein's code) run as its authors run it, with its state
file for resumption; its per-attack accuracies and warning flags are read from its own log."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

_AFTER = re.compile(r"robust accuracy after (\S+): ([\d.]+)%")
_INITIAL = re.compile(r"initial accuracy: ([\d.]+)%")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def autoattack(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str,
    eps: float,
    version: str,
    attacks: list[str] | None,
    seed: int,
    batch_size: int,
    state_path: Path | None = None,
) -> dict[str, Any]:
    """Robust accuracy under AutoAttack and what it reported along the way."""
    from pyautoattack import AutoAttack
    from pyautoattack.state import EvaluationState

    aa = AutoAttack(
        model,
        norm=norm,  # type: ignore[arg-type]
        eps=eps,
        version=version,  # type: ignore[arg-type]
        attacks=attacks if version == "custom" else None,  # type: ignore[arg-type]
        seed=seed,
        device=x.device,
    )
    logger = logging.getLogger("auto-attack")
    handler, level, propagate = _Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # its per-attack accuracies are DEBUG records: kept, not printed
    logger.propagate = False
    resumed = bool(state_path and state_path.exists())
    try:
        try:
            _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state_path)
        except UnboundLocalError:
            # pyautoattack 0.2.0 cannot continue a restored state whose remaining attacks find adversarial
            # inputs (`y_adv` is only bound on a fresh start): evaluate afresh.
            assert state_path is not None
            state_path.unlink()
            resumed = False
            _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state_path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    if state_path is not None:
        robust = EvaluationState.from_disk(state_path).robust_flags
        clean = EvaluationState.from_disk(state_path).clean_accuracy
    else:
        robust = (y_adv == y).cpu()
        clean = float("nan")
    if clean != clean:  # no state file: the clean accuracy AutoAttack logged
        clean = next((float(m.group(1)) / 100 for r in handler.records if (m := _INITIAL.search(r.getMessage()))), clean)
    per_attack = {
        m.group(1).lower(): float(m.group(2)) / 100 for r in handler.records if (m := _AFTER.search(r.getMessage()))
    }
    flags = sorted({r.getMessage() for r in handler.records if r.levelno >= logging.WARNING})
    return {
        "norm": norm,
        "eps": eps,
        "version": version,
        "attacks": list(aa.attacks_to_run),
        "clean": float(clean),
        "robust": float(robust.float().mean()),
        "robust_flags": robust.tolist(),
        "per_attack": per_attack,
        "flags": flags,
        "resumed": resumed,
    }
