"""Running a stage task and turning its final state into a StageRecord: a Prefect cache hit becomes
`cached` once its artifacts check out; a failure becomes one line plus a traceback file in the store.

With `execution: deployments` the same calls start flow runs of the stage deployments instead (see
flows/stage.py and flows/dispatch.py); what comes back is the same record."""

from __future__ import annotations

import traceback
from typing import Any

from prefect import get_run_logger

from microscope.errors import InputError, StorageError, describe_os_error, final_errno
from microscope.settings import get_settings
from microscope.stages.runner import finished
from microscope.store import ArtifactStore
from schemas.records import StageRecord, StageStatus

INPUT_ERROR = "InputError"  # the name of a stage flow run's Failed state when the user's input was at fault


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and final_errno(exc) is not None:  # a full disk, a read-only store: no retry cures it
        return describe_os_error(exc)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg if type(exc).__module__.startswith("microscope") else f"{type(exc).__name__}: {msg}"


class Settler:
    """Runs stage tasks for one audit; failures are written to `audits/<id>/<stage>[variant].log`."""

    def __init__(self, store: ArtifactStore, audit_id: str, dispatch: bool | None = None):
        self.store = store
        self.audit_id = audit_id
        self.dispatch = get_settings().execution == "deployments" if dispatch is None else dispatch

    def run(self, task: Any, stage: str, label: str, **kwargs: Any) -> Any:
        if self.dispatch:
            return self._dispatch(task, stage, {label: kwargs})[label]
        get_run_logger().info("%s: started", label)
        return self.settle(task(**_quoted(kwargs), return_state=True), task, stage, label, kwargs)

    def run_many(
        self, task: Any, stage: str, calls: dict[str, dict[str, Any]], side_by_side: bool = True
    ) -> dict[str, Any]:
        """One task run per call: side by side on the task runner's workers (one after another where
        `side_by_side` is false, e.g. SAEs that each want the whole machine), or as parallel flow runs
        of the stage deployment, each on its own pod."""
        if self.dispatch:
            return self._dispatch(task, stage, calls)
        if not side_by_side:
            return {label: self.run(task, stage, label, **kw) for label, kw in calls.items()}
        futures = {label: task.submit(**_quoted(kw)) for label, kw in calls.items()}
        for f in futures.values():
            f.wait()
        return {label: self.settle(f.state, task, stage, label, calls[label]) for label, f in futures.items()}

    def settle(self, state: Any, task: Any, stage: str, label: str, kwargs: dict[str, Any]) -> Any:
        if state.is_completed():
            result = state.result()
            if state.name != "Cached":
                return result
            recs = result if isinstance(result, dict) else {None: result}
            if any(finished(self.store, r.details.get("prefix", "")) is None for r in recs.values()):
                # Prefect remembers the task, but the store lost or damaged what it made: recompute
                get_run_logger().warning("%s: cached artifacts are missing or damaged; recomputing", label)
                again = task.with_options(refresh_cache=True)(**_quoted(kwargs), return_state=True)
                return self.settle(again, task, stage, label, kwargs)
            cached = {k: r.model_copy(update={"status": StageStatus.cached}) for k, r in recs.items()}
            return cached if isinstance(result, dict) else cached[None]
        return self.failed(stage, label, state.result(raise_on_failure=False))

    def _dispatch(self, task: Any, stage: str, calls: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from flows.dispatch import run_stage_deployments

        try:
            states = run_stage_deployments(task.fn.__name__, stage, self.audit_id, self.store.uri, calls)
        except InputError as exc:  # the stage deployments are not registered: each call fails, saying why
            return {label: self.failed(stage, label, exc) for label in calls}
        return {label: self.settle_remote(state, stage, label) for label, state in states.items()}

    def settle_remote(self, state: Any, stage: str, label: str) -> Any:
        """A stage flow run's final state as the record(s) its task returned."""
        if state.is_completed():
            return _records(state.result())
        error = state.message or f"{label}: the stage's flow run ended {state.type.value.lower()}"
        get_run_logger().error("%s", error)
        return StageRecord(
            stage=stage, status=StageStatus.failed, error=error, details={"input_error": state.name == INPUT_ERROR}
        )

    def failed(self, stage: str, label: str, exc: Any) -> StageRecord:
        """A failed stage's record: the cause in one line, the traceback in a log file beside the audit."""
        if not isinstance(exc, BaseException):
            return StageRecord(stage=stage, status=StageStatus.failed, error=f"{label}: {exc}")
        error = f"{label}: {one_line(exc)}"
        # the user's own mistake needs no traceback, nor does a full or read-only store (which could not take it)
        if not isinstance(exc, InputError | StorageError) and final_errno(exc) is None:
            key = f"audits/{self.audit_id}/{label.replace('/', '_')}.log"
            text = "".join(traceback.format_exception(exc))
            error += f" (traceback: {self.store.put_bytes(key, text.encode())})"
        get_run_logger().error("%s", error)
        return StageRecord(
            stage=stage, status=StageStatus.failed, error=error, details={"input_error": isinstance(exc, InputError)}
        )


def _quoted(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Task arguments Prefect hands over as they are: its walk through every field of every record (looking
    for futures, which stage inputs never hold) cost a tenth of a second per stage."""
    from prefect.utilities.annotations import quote

    return {k: quote(v) for k, v in kwargs.items()}


def _records(result: Any) -> StageRecord | dict[str, StageRecord]:
    """A stage flow's JSON result as records again: one, or one per hook."""
    if isinstance(result, StageRecord) or (isinstance(result, dict) and "stage" in result and "status" in result):
        return StageRecord.model_validate(result)
    return {k: StageRecord.model_validate(v) for k, v in result.items()}
