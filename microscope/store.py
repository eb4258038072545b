"""Artifact store: a local folder or `s3://bucket/prefix`, addressed by content keys.

Keys look like `{model_digest}/{stage}/{config_hash}/name`. Every write is atomic (a temp name then a
rename locally; a single PUT or a completed multipart upload on S3), and each stage writes its
`manifest.json` last, so a stage killed half way never looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from microscope.errors import InputError, TransientError

MANIFEST = "manifest.json"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid artifact key {key!r}: use relative 'a/b/c' keys without '..'")
    return key


class ArtifactStore(ABC):
    uri: str

    @abstractmethod
    def uri_for(self, key: str) -> str: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str: ...

    @abstractmethod
    def put_file(self, key: str, path: Path, move: bool = False) -> str: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix`, sorted."""

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A local file with the key's content (the file itself locally, a cached download on S3)."""

    @abstractmethod
    def staging_path(self, key: str) -> Path:
        """Where to build a file that will be `put_file(key, ..., move=True)`."""

    def put_json(self, key: str, obj: Any) -> str:
        return self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def write_manifest(self, prefix: str, manifest: dict[str, Any]) -> str:
        """Write last: its presence is what marks `prefix` as complete."""
        return self.put_json(f"{prefix}/{MANIFEST}", manifest)

    def read_manifest(self, prefix: str) -> dict[str, Any] | None:
        key = f"{prefix}/{MANIFEST}"
        return self.get_json(key) if self.exists(key) else None


class LocalStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def uri_for(self, key: str) -> str:
        return str(self._path(key))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _tmp(self, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")

    def put_bytes(self, key: str, data: bytes) -> str:
        dest = self._path(key)
        tmp = self._tmp(dest)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        return str(dest)

    def put_file(self, key: str, path: Path, move: bool = False) -> str:
        dest = self._path(key)
        tmp = self._tmp(dest)
        if move:
            try:
                os.replace(path, tmp)  # same filesystem: a rename, no copy
            except OSError:
                shutil.copyfile(path, tmp)
                os.unlink(path)
        else:
            shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
        return str(dest)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise InputError(f"artifact {self.uri_for(key)} is missing; re-run the stage that writes it") from None

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        out = []
        for p in base.rglob("*"):
            if p.is_file() and ".tmp-" not in p.name:
                out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def staging_path(self, key: str) -> Path:
        dest = self._path(key)
        return self._tmp(dest)


class S3Store(ArtifactStore):
    """S3 or MinIO via boto3; the endpoint comes from `MICROSCOPE_S3_ENDPOINT_URL` or `AWS_ENDPOINT_URL`."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig

        rest = uri.removeprefix("s3://")
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise InputError(f"store URI {uri!r} names no bucket; write it as s3://bucket/prefix")
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        endpoint = endpoint_url or os.environ.get("MICROSCOPE_S3_ENDPOINT_URL") or None
        self.client = boto3.client("s3", endpoint_url=endpoint)
        # Multipart above 16 MiB: the object appears only when the upload completes (atomic).
        self.transfer = TransferConfig(multipart_threshold=16 * 2**20, multipart_chunksize=16 * 2**20)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _call(self, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket",):
                raise InputError(f"bucket '{self.bucket}' does not exist; create it or fix the store URI") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise InputError(f"S3 refused access to {self.uri} ({code}); check the credentials") from None
            raise
        except BotoCoreError as exc:
            raise TransientError(f"S3 store {self.uri} unreachable: {exc}") from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def put_bytes(self, key: str, data: bytes) -> str:
        self._call(self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)
        return self.uri_for(key)

    def put_file(self, key: str, path: Path, move: bool = False) -> str:
        self._call(self.client.upload_file, str(path), self.bucket, self._key(key), Config=self.transfer)
        if move:
            Path(path).unlink(missing_ok=True)
        return self.uri_for(key)

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise InputError(f"artifact {self.uri_for(key)} is missing; re-run the stage that writes it") from None
            raise

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) if prefix else self.prefix
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        for page in self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full))):
            out += [o["Key"][strip:] for o in page.get("Contents", [])]
        return sorted(out)

    def local_path(self, key: str) -> Path:
        from microscope.workspace import staging_dir

        dest = staging_dir() / "s3-cache" / self.bucket / self._key(key)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
            self._call(self.client.download_file, self.bucket, self._key(key), str(tmp), Config=self.transfer)
            os.replace(tmp, dest)
        return dest

    def staging_path(self, key: str) -> Path:
        from microscope.workspace import staging_dir

        p = staging_dir() / "upload" / self.bucket / f"{self._key(key)}.tmp-{uuid.uuid4().hex[:8]}"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def open_store(uri: str | None = None) -> ArtifactStore:
    from microscope.workspace import store_uri

    uri = uri or store_uri()
    if uri.startswith("s3://"):
        return S3Store(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise InputError(f"unsupported store URI {uri!r}; use a folder path or s3://bucket/prefix")
    return LocalStore(uri.removeprefix("file://"))
