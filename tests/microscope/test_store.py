from __future__ import annotations

from pathlib import Path

import pytest

from microscope.errors import InputError
from microscope.store import LocalStore, S3Store, open_store
from tests.conftest import make_bucket


def exercise(store) -> None:
    store.put_bytes("m/stage/h/a.bin", b"abc")
    store.put_json("m/stage/h/b.json", {"x": 1})
    assert store.exists("m/stage/h/a.bin") and not store.exists("m/stage/h/zzz")
    assert store.get_bytes("m/stage/h/a.bin") == b"abc"
    assert store.get_json("m/stage/h/b.json") == {"x": 1}
    assert store.read_manifest("m/stage/h") is None
    store.write_manifest("m/stage/h", {"ok": True})
    assert store.read_manifest("m/stage/h") == {"ok": True}
    tmp = store.staging_path("m/stage/h/c.parquet")
    tmp.write_bytes(b"x" * 1000)
    store.put_file("m/stage/h/c.parquet", tmp, move=True)
    assert not tmp.exists()
    assert store.list("m/stage") == [
        "m/stage/h/a.bin",
        "m/stage/h/b.json",
        "m/stage/h/c.parquet",
        "m/stage/h/manifest.json",
    ]
    assert store.local_path("m/stage/h/c.parquet").read_bytes() == b"x" * 1000
    with pytest.raises(InputError, match="missing"):
        store.get_bytes("m/none")
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.put_bytes("../escape", b"")
    # delete_prefix removes a folder's artifacts, not those of a sibling whose name starts the same
    store.put_bytes("m/stage/hh/x.bin", b"1")
    assert store.delete_prefix("m/stage/h") == 4
    assert store.list("m") == ["m/stage/hh/x.bin"] and not store.exists("m/stage/h/manifest.json")
    assert store.delete_prefix("m/stage/h") == 0
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.delete_prefix("")  # never the whole store


def test_local_store(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "art"))
    assert isinstance(store, LocalStore)
    exercise(store)
    # No temp files are left behind or listed.
    assert not [p for p in (tmp_path / "art").rglob("*") if ".tmp-" in p.name]


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies before the rename leaves the old content (or nothing), never a half file."""
    import os

    store = LocalStore(tmp_path)
    store.put_bytes("k/v", b"old")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.put_bytes("k/v", b"new-but-interrupted")
    monkeypatch.undo()
    assert store.get_bytes("k/v") == b"old"


def test_s3_store_on_moto(s3_env: str, home: Path) -> None:
    make_bucket(s3_env, "unit")
    store = open_store("s3://unit/some/prefix")
    assert isinstance(store, S3Store) and store.uri == "s3://unit/some/prefix"
    exercise(store)
    assert store.uri_for("a/b") == "s3://unit/some/prefix/a/b"


def test_s3_multipart_upload_completes(s3_env: str, home: Path, tmp_path: Path) -> None:
    make_bucket(s3_env, "big")
    store = S3Store("s3://big")
    data = bytes(range(256)) * (20 * 2**20 // 256)  # 20 MiB: over the multipart threshold
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.put_file("x/big.bin", src)
    assert store.get_bytes("x/big.bin") == data


def test_s3_missing_bucket_is_input_error(s3_env: str, home: Path) -> None:
    with pytest.raises(InputError, match="bucket 'nobucket' does not exist"):
        S3Store("s3://nobucket/p").put_bytes("a", b"x")


def test_unsupported_uri() -> None:
    with pytest.raises(InputError, match="unsupported store URI"):
        open_store("gs://bucket")


def test_tracking_uri_never_shows_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from microscope.tracking import mlflow_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg2://ml:s3cret@db.internal:5432/mlflow")
    assert mlflow_tracking_uri() == "postgresql+psycopg2://ml:***@db.internal:5432/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x/mlflow.db")
    assert mlflow_tracking_uri() == "sqlite:////tmp/x/mlflow.db"
