"""Finding the checkpoints under a prefix (a local folder or s3://bucket/prefix), for the `watch` flow.

A checkpoint is an HF folder (a directory holding `config.json`) or a weights file (.safetensors, .pt,
.pth, .bin) directly under the prefix. Each gets a digest of its content, so the same bytes under a
new name are recognised, and a step read from its name (`step-4000`, `checkpoint-4000`, `epoch=1-step=4000`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from microscope.errors import InputError
from microscope.models.checkpoint import WEIGHT_SUFFIXES

_STEP = re.compile(r"(?:step|checkpoint|ckpt|iter)[-_=]?(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Checkpoint:
    uri: str
    digest: str  # of the files' names and content (S3: their ETags, which S3 derives from the content)
    step: int | None


def step_of(name: str) -> int | None:
    """The training step in a checkpoint's name: the last `step-N` / `checkpoint-N` in it."""
    found = _STEP.findall(name)
    return int(found[-1]) if found else None


def find_checkpoints(prefix: str) -> list[Checkpoint]:
    """The checkpoints directly under `prefix`, ordered by step (then name)."""
    found = _find_s3(prefix) if prefix.startswith("s3://") else _find_local(Path(prefix).expanduser())
    return sorted(found, key=lambda c: (c.step is None, c.step or 0, c.uri))


def _digest(parts: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, content in sorted(parts):
        h.update(f"{name}\0{content}\0".encode())
    return h.hexdigest()


def _file_sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _find_local(root: Path) -> list[Checkpoint]:
    if not root.is_dir():
        raise InputError(f"checkpoint prefix {root} is not a folder; pass a folder or s3://bucket/prefix")
    candidates = [root] if (root / "config.json").exists() else sorted(root.iterdir())
    out = []
    for p in candidates:
        if p.name.startswith("."):
            continue
        if p.is_dir() and (p / "config.json").exists():
            files = [f for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith(".")]
            digest = _digest([(f.relative_to(p).as_posix(), _file_sha(f)) for f in files])
        elif p.is_file() and p.suffix in WEIGHT_SUFFIXES:
            digest = _digest([(p.name, _file_sha(p))])
        else:
            continue
        out.append(Checkpoint(uri=str(p), digest=digest, step=step_of(p.name)))
    return out


def _find_s3(prefix: str) -> list[Checkpoint]:
    from microscope.store import S3Store

    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    key = key.strip("/")
    store = S3Store(f"s3://{bucket}")
    base = f"{key}/" if key else ""
    pages = store._call(
        lambda: list(store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base))
    )
    groups: dict[str, list[tuple[str, str]]] = {}
    for o in (o for page in pages for o in page.get("Contents", [])):
        rel = o["Key"][len(base) :]
        top, _, rest = rel.partition("/")
        groups.setdefault(top, []).append((rest, o["ETag"].strip('"')))
    out = []
    for top, files in sorted(groups.items()):
        names = {name for name, _ in files}
        if "config.json" in names:  # an HF folder
            out.append(Checkpoint(uri=f"s3://{bucket}/{base}{top}", digest=_digest(files), step=step_of(top)))
        elif names == {""} and top.endswith(WEIGHT_SUFFIXES):  # a weights file
            out.append(
                Checkpoint(uri=f"s3://{bucket}/{base}{top}", digest=_digest([(top, files[0][1])]), step=step_of(top))
            )
    return out
