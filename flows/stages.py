"""Stage selection, kept free of Prefect so the CLI can check `--stages` before starting anything."""

from __future__ import annotations

from schemas.config import STAGE_DEPENDENCIES, STAGES


def expand_stages(requested: list[str] | None) -> list[str]:
    """The requested stages plus everything they depend on, in pipeline order."""
    if not requested:
        return list(STAGES)
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)} in --stages; choose from {', '.join(STAGES)}")
    need: set[str] = set()
    todo = list(requested)
    while todo:
        s = todo.pop()
        if s not in need:
            need.add(s)
            todo.extend(STAGE_DEPENDENCIES[s])
    return [s for s in STAGES if s in need]
