"""Artifact store: a local folder or `s3://bucket/prefix`, addressed by content keys.

Keys look like `{model_digest}/{stage}/{config_hash}/name`. Every write is atomic (a temp name then a
rename locally; a single PUT or a completed multipart upload on S3), and each stage writes its
`manifest.json` last, so a stage killed half way never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microscope.errors import InputError, StorageError, TransientError, describe_os_error

if TYPE_CHECKING:
    from microscope.settings import Settings

MANIFEST = "manifest.json"
TMP_MARK = ".tmp-"  # files being written carry it until renamed; a killed writer leaves them behind
log = logging.getLogger("microscope.store")


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid artifact key {key!r}: use relative 'a/b/c' keys without '..'")
    return key


@contextmanager
def _removed_on_failure(tmp: Path) -> Iterator[None]:
    """A write that fails (a full disk) takes its half-written file with it: the space is given back."""
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _settings(given: Settings | None) -> Settings:
    """The settings a store was opened with: read once, where it is opened, unless its opener passes them."""
    if given is not None:
        return given
    from microscope.settings import get_settings

    return get_settings()


class ArtifactStore(ABC):
    uri: str
    settings: Settings  # what it was opened with: its scratch folders, S3 endpoint, where its locks live

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
    def size(self, key: str) -> int | None:
        """Bytes of the artifact, None when it does not exist."""

    @abstractmethod
    def sha256(self, key: str) -> str: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every artifact under the folder `prefix` (`a/b` spares `a/bc`); returns how many."""

    @abstractmethod
    def clean_orphans(self, prefix: str, why: str = "left half-written by a killed run") -> int:
        """Remove what killed or failed writers left under `prefix` (temp files, unfinished uploads); returns
        how many. Call only while holding the prefix's stage lock."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise StorageError (one line) when nothing can be written here: checked before an audit starts,
        so that a read-only store is not found out after every stage ran."""

    # Whether reading a cached stage re-hashes its artifacts (cheap on local disk; on S3 sizes are
    # checked instead: objects appear whole or not at all, and re-hashing would download everything).
    verifies_content: bool = True

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
    def __init__(self, root: str | Path, settings: Settings | None = None):
        self.settings = _settings(settings)
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
        return dest.with_name(f".{dest.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")

    def put_bytes(self, key: str, data: bytes) -> str:
        dest = self._path(key)
        tmp = self._tmp(dest)
        with _removed_on_failure(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        return str(dest)

    def put_file(self, key: str, path: Path, move: bool = False) -> str:
        dest = self._path(key)
        tmp = self._tmp(dest)
        with _removed_on_failure(tmp):
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

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def sha256(self, key: str) -> str:
        with open(self._path(key), "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        base = self._path(prefix)
        if not base.is_dir():
            return 0
        n = sum(1 for p in base.rglob("*") if p.is_file() and TMP_MARK not in p.name)
        shutil.rmtree(base)
        return n

    def clean_orphans(self, prefix: str, why: str = "left half-written by a killed run") -> int:
        base = self.root / prefix
        if not base.exists():
            return 0
        orphans = [p for p in base.rglob(f"*{TMP_MARK}*") if p.is_file()]
        for p in orphans:
            log.warning("removing %s, %s", p, why)
            p.unlink(missing_ok=True)
        return len(orphans)

    def check_writable(self) -> None:
        probe = self.root / f".write-probe{TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(describe_os_error(exc, f"store {self.uri} is not writable")) from None

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
            if p.is_file() and TMP_MARK not in p.name:
                out.append(p.relative_to(self.root).as_posix())
        return sorted(out)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def staging_path(self, key: str) -> Path:
        dest = self._path(key)
        return self._tmp(dest)


class S3Store(ArtifactStore):
    """S3 or MinIO via boto3; the endpoint comes from the settings (`MICROSCOPE_S3_ENDPOINT_URL`)."""

    def __init__(self, uri: str, endpoint_url: str | None = None, settings: Settings | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig

        rest = uri.removeprefix("s3://")
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise InputError(f"store URI {uri!r} names no bucket; write it as s3://bucket/prefix")
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.settings = _settings(settings)
        endpoint = endpoint_url or self.settings.s3_endpoint_url
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
        return self._head(key) is not None

    verifies_content = False

    def put_bytes(self, key: str, data: bytes) -> str:
        meta = {"sha256": hashlib.sha256(data).hexdigest()}
        self._call(self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data, Metadata=meta)
        return self.uri_for(key)

    def put_file(self, key: str, path: Path, move: bool = False) -> str:
        with open(path, "rb") as f:  # hashed on the way up: the manifest then needs no read-back
            meta = {"sha256": hashlib.file_digest(f, "sha256").hexdigest()}
        self._call(
            self.client.upload_file,
            str(path),
            self.bucket,
            self._key(key),
            Config=self.transfer,
            ExtraArgs={"Metadata": meta},
        )
        if move:
            Path(path).unlink(missing_ok=True)
        return self.uri_for(key)

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else int(head["ContentLength"])

    def sha256(self, key: str) -> str:
        head = self._head(key)
        if head is not None and head.get("Metadata", {}).get("sha256"):
            return head["Metadata"]["sha256"]
        body = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(key))["Body"]
        h = hashlib.sha256()  # written by something else: hash the bytes
        while chunk := body.read(2**20):
            h.update(chunk)
        return h.hexdigest()

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        full = self._key(prefix) + "/"
        self.clean_orphans(prefix)  # an upload still open there would otherwise appear after the delete
        paginator = self.client.get_paginator("list_objects_v2")
        n = 0
        for page in self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full))):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]  # a page is at most 1000: one request
            if keys:
                resp = self._call(
                    self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}
                )
                if errors := resp.get("Errors"):
                    raise TransientError(f"S3 did not delete {len(errors)} object(s) under {self.uri_for(prefix)}")
                n += len(keys)
        return n

    def clean_orphans(self, prefix: str, why: str = "left by a killed run") -> int:
        """Abort multipart uploads that a killed run started under `prefix` (their parts cost storage), and
        remove the local files staged for them."""
        resp = self._call(self.client.list_multipart_uploads, Bucket=self.bucket, Prefix=self._key(prefix) + "/")
        uploads = resp.get("Uploads", [])
        for u in uploads:
            log.warning("aborting the unfinished upload of s3://%s/%s, %s", self.bucket, u["Key"], why)
            self._call(self.client.abort_multipart_upload, Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
        staged = self.settings.staging_dir() / "upload" / self.bucket / self._key(prefix)
        files = [p for p in staged.rglob(f"*{TMP_MARK}*") if p.is_file()] if staged.is_dir() else []
        for p in files:
            p.unlink(missing_ok=True)
        return len(uploads) + len(files)

    def check_writable(self) -> None:
        key = f".write-probe/{uuid.uuid4().hex}"
        try:
            self.put_bytes(key, b"")
            self.delete(key)
        except Exception as exc:  # noqa: BLE001 -- botocore raises several types for one meaning
            raise StorageError(
                f"store {self.uri} is not writable ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "check the bucket, its credentials and their write permission"
            ) from None

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
        dest = self.settings.staging_dir() / "s3-cache" / self.bucket / self._key(key)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
            self._call(self.client.download_file, self.bucket, self._key(key), str(tmp), Config=self.transfer)
            os.replace(tmp, dest)
        return dest

    def staging_path(self, key: str) -> Path:
        p = self.settings.staging_dir() / "upload" / self.bucket / f"{self._key(key)}.tmp-{uuid.uuid4().hex[:8]}"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def open_store(uri: str | None = None, settings: Settings | None = None) -> ArtifactStore:
    """The store at `uri` (default: the settings' store), opened with `settings` (default: read now)."""
    s = _settings(settings)
    uri = uri or s.store_uri
    if uri.startswith("s3://"):
        return S3Store(uri, settings=s)
    if "://" in uri and not uri.startswith("file://"):
        raise InputError(f"unsupported store URI {uri!r}; use a folder path or s3://bucket/prefix")
    return LocalStore(uri.removeprefix("file://"), settings=s)
