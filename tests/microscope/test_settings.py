"""The one settings object: defaults, the environment names it honours, and a bad value's message."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from microscope.settings import Settings, get_settings


def test_embedded_defaults_live_in_the_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("MICROSCOPE_HOME", "MICROSCOPE_STORE", "MLFLOW_TRACKING_URI", "QDRANT_URL", "MICROSCOPE_REDIS_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    s = get_settings()
    assert s.home_dir == (tmp_path / ".microscope").resolve()
    assert s.store_uri == str(s.home_dir / "artifacts")
    assert s.mlflow_uri == f"sqlite:///{s.home_dir / 'mlflow.db'}"
    assert s.qdrant_dir == s.home_dir / "qdrant" and s.redis_url is None
    assert s.torch_device() == "cpu"  # auto, and this machine has no GPU


def test_environment_names_and_changes_are_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROSCOPE_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg2://u@db/mlflow")
    monkeypatch.setenv("QDRANT_URL", "http://qdrant:6333")
    monkeypatch.setenv("QDRANT_API_KEY", "qk-7f3a9e")
    monkeypatch.setenv("MICROSCOPE_WEBHOOK_SECRET", "whsec_b2xkIG9uZQ== whsec_bmV3IG9uZQ==")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("MICROSCOPE_REDIS_URL", "redis://r:6379/0")
    s = get_settings()
    assert s.mlflow_uri == "postgresql+psycopg2://u@db/mlflow" and s.qdrant_url == "http://qdrant:6333"
    assert s.s3_endpoint_url == "http://minio:9000" and s.redis_url == "redis://r:6379/0"
    assert "qk-7f3a9e" not in repr(s) and s.qdrant_api_key.get_secret_value() == "qk-7f3a9e"
    assert "b2xkIG9uZQ" not in repr(s) and s.webhook_secrets() == ["whsec_b2xkIG9uZQ==", "whsec_bmV3IG9uZQ=="]
    monkeypatch.setenv("MICROSCOPE_STORE", "s3://bucket/audits")
    assert get_settings().store_uri == "s3://bucket/audits"  # read anew when the environment changes


def test_a_bad_device_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROSCOPE_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="use auto, cpu, cuda or cuda:N"):
        Settings()
