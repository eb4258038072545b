"""The reference AutoAttack (pyautoattack, Croce & Hein's code) run as its authors run it, with its state
file for resumption; its per-attack accuracies and warning flags are read from its own log."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

_AFTER = re.compile(r"robust accuracy after (\S+): ([\d.]+)%")


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
    import pyautoattack
    from pyautoattack import AutoAttack

    aa = AutoAttack(
        model,
        norm=norm,  # type: ignore[arg-type]
        eps=eps,
        version=version,  # type: ignore[arg-type]
        attacks=attacks if version == "custom" else None,  # type: ignore[arg-type]
        seed=seed,
        device=x.device,
    )
    done = _finished(state_path, aa.attacks_to_run)
    if done is not None:  # finished before an interruption: AutoAttack's own record of it
        return done | {"resumed": True}
    restarted = state_path is not None and state_path.exists()
    if restarted:
        # pyautoattack 0.2.0 cannot continue a partial state: EvaluationState.from_disk returns the attack
        # lists as lists (never equal to the sets it compares them with) and `y_adv` is only bound on a
        # fresh start. So a partial evaluation starts again (the finished norms and variants do not).
        state_path.unlink()
    logger = logging.getLogger("auto-attack")
    handler, level, propagate = _Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # its per-attack accuracies are DEBUG records: kept, not printed
    logger.propagate = False
    try:
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size, state_path=state_path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    robust = (y_adv == y).cpu()
    with torch.no_grad():  # AutoAttack's first step, recomputed exactly (its log rounds to 0.01%)
        correct = sum(
            int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
            for i in range(0, len(x), batch_size)
        )
    per_attack = {  # as AutoAttack logged them (to 0.01%)
        m.group(1).lower(): float(m.group(2)) / 100 for r in handler.records if (m := _AFTER.search(r.getMessage()))
    }
    flags = sorted({r.getMessage() for r in handler.records if r.levelno >= logging.WARNING})
    result = {
        "norm": norm,
        "eps": eps,
        "version": version,
        "library": f"pyautoattack {pyautoattack.__version__}",
        "attacks": list(aa.attacks_to_run),
        "clean": correct / len(x),
        "robust": int(robust.sum()) / len(robust),  # as AutoAttack computes it
        "robust_flags": robust.tolist(),
        "per_attack": per_attack,
        "flags": flags + (["a partial AutoAttack state was found and evaluated afresh"] if restarted else []),
        "resumed": False,
    }
    if state_path is not None:
        _result_path(state_path).write_text(json.dumps(result))
    return result


def _result_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.stem + ".result.json")


def _finished(state_path: Path | None, attacks: list[str]) -> dict[str, Any] | None:
    """Our result of a finished evaluation whose state file says every attack ran."""
    if state_path is None or not state_path.exists() or not _result_path(state_path).exists():
        return None
    state = json.loads(state_path.read_text())
    if set(state.get("_run_attacks", [])) != set(attacks):
        return None
    return json.loads(_result_path(state_path).read_text())
