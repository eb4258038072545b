"""Settings are read at the entry points and passed down (issue 22): inside the SDK, `get_settings()` is
called only where a resource is opened (the store, MLflow, Qdrant, S3 uploads, the torch device, a
callback's address policy); everything below those takes what it needs as parameters or from the store
it was handed (`store.settings`). A new call elsewhere fails here: pass the settings down instead."""

from __future__ import annotations

import ast
from pathlib import Path

SDK = Path(__file__).resolve().parents[2] / "microscope"

OPENERS = {
    "store.py": {"_settings"},  # open_store / a store's constructor: the store then carries them
    "tracking.py": {"_mlflow", "_experiment_id", "audit_runs", "mlflow_tracking_uri"},
    "vectors.py": {"__init__", "reader_index", "local_version"},
    "integrations/notify.py": {"_resolve", "upload"},  # the training job's side: its own process
    "models/loading.py": {"compute_device"},
    "result_callback.py": {"post_result"},  # a caller may pass allow_private; the default is the setting
}


def _callers(path: Path) -> set[str]:
    """Names of the functions in `path` that call get_settings()."""
    found: set[str] = set()

    def visit(node: ast.AST, fn: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else fn
            if isinstance(child, ast.Call) and getattr(child.func, "id", None) == "get_settings":
                found.add(fn or "<module>")
            visit(child, name)

    visit(ast.parse(path.read_text()), None)
    return found


def test_the_sdk_reads_settings_only_where_it_opens_a_resource() -> None:
    extra = {}
    for path in sorted(SDK.rglob("*.py")):
        rel = path.relative_to(SDK).as_posix()
        if rel == "settings.py":
            continue
        unexpected = _callers(path) - OPENERS.get(rel, set())
        if unexpected:
            extra[rel] = sorted(unexpected)
    assert extra == {}, f"get_settings() below the entry points: {extra}; pass the settings down instead"


def test_the_check_sees_a_call(tmp_path: Path) -> None:
    """The checker itself: a call inside a method is attributed to that method, one at module level too."""
    probe = tmp_path / "probe.py"
    probe.write_text("class A:\n    def f(self):\n        return get_settings().x\n\n\nS = get_settings()\n")
    assert _callers(probe) == {"f", "<module>"}
