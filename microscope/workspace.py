"""Where an audit's embedded defaults live: `$MICROSCOPE_HOME` or `./.microscope`."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("MICROSCOPE_HOME") or Path.cwd() / ".microscope").resolve()


def store_uri() -> str:
    """Artifact store: `$MICROSCOPE_STORE` (a folder or s3://bucket/prefix), else the workspace folder."""
    return os.environ.get("MICROSCOPE_STORE") or str(home() / "artifacts")


def mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    return os.environ.get("MICROSCOPE_MLFLOW_ARTIFACTS") or (home() / "mlartifacts").as_uri()


def staging_dir() -> Path:
    """Local scratch for files on their way to a remote store."""
    p = home() / "staging"
    p.mkdir(parents=True, exist_ok=True)
    return p
