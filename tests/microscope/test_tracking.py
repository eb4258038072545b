"""MLflow tracking on SQLite: a new workspace's database starts from an empty one migrated once per MLflow
version (the per-user cache), and works as one MLflow made itself."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_a_new_workspace_starts_from_the_migrated_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from microscope import tracking

    monkeypatch.setenv("MICROSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ids = {}
    for ws in ("a", "b"):
        monkeypatch.setenv("MICROSCOPE_HOME", str(tmp_path / ws))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
        ids[ws] = tracking.start_audit_run(f"audit-{ws}", {"microscope.audit_id": f"audit-{ws}"}, {"seed": 0})
        assert (tmp_path / ws / "mlflow.db").exists()
    (template,) = (tmp_path / "cache").glob("mlflow-*-empty.db")
    assert template.name == f"mlflow-{mlflow.__version__}-empty.db"
    for ws, run_id in ids.items():  # each workspace holds its own run, and only that one
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / ws / 'mlflow.db'}")
        run = client.get_run(run_id)
        assert run.data.tags["microscope.audit_id"] == f"audit-{ws}"
        exp = client.get_experiment(run.info.experiment_id)
        assert exp.name == "microscope" and len(client.search_runs([exp.experiment_id])) == 1
    # the template itself stays empty: no experiment but MLflow's Default
    client = mlflow.MlflowClient(f"sqlite:///{template}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
