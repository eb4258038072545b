"""Find, fingerprint and safely read checkpoints.

Pickled weights are read only with `torch.load(weights_only=True)`: a pickle that carries code is
refused before anything in it runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path
from typing import Any

from microscope.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# What a training checkpoint folder holds beside the model (HF Trainer, Lightning exports): never loaded,
# digested or fetched, so their pickles are never opened and a 7B run's optimizer state never downloaded.
TRAINER_STATE = ("optimizer", "scheduler", "rng_state", "training_args", "scaler", "trainer_state")


def is_trainer_state(name: str) -> bool:
    return name.startswith(TRAINER_STATE)


def looks_like_path(source: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else is meant as a local path."""
    return source.startswith(("/", ".", "~")) or source.endswith(WEIGHT_SUFFIXES) or source.count("/") > 1


def locate(source: str, revision: str | None = None) -> Path:
    """A local folder or file for `source`: an s3:// checkpoint is fetched into the local cache, a hub
    id downloaded where the hub is reachable."""
    if source.startswith("s3://"):
        return fetch_s3(source)
    p = Path(source).expanduser()
    if p.exists():
        return p.resolve()
    if p.is_symlink():  # exists() is False for a link that loops or dangles: it is no hub id either
        raise InputError(
            f"model path {source} is a symbolic link that loops or leads nowhere; point it at the checkpoint"
        )
    if looks_like_path(source):
        raise InputError(f"model path {source} does not exist; pass an HF folder, a weights file or a hub id")
    return _download(source, revision)


def local_path(resolved_path: str | None, source: str) -> Path:
    """Where this machine reads the checkpoint: on another pod than the one that resolved it, an s3://
    checkpoint is fetched again into this machine's cache."""
    path = Path(resolved_path or source)
    return path if path.exists() or not source.startswith("s3://") else fetch_s3(source)


def fetch_s3(uri: str) -> Path:
    """An s3:// checkpoint (an HF folder's prefix, or one weights file) copied into the local cache
    (checkpoints are immutable: an object already there is not fetched again)."""
    from microscope.store import S3Store

    bucket, _, key = uri.removeprefix("s3://").rstrip("/").partition("/")
    if not bucket or not key:
        raise InputError(f"model URI {uri!r} names no object; write it as s3://bucket/path/to/checkpoint")
    store = S3Store(f"s3://{bucket}")
    pages = store._call(
        lambda: list(store.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"))
    )
    files = [
        o["Key"]
        for page in pages
        for o in page.get("Contents", [])
        if not o["Key"].endswith("/") and not is_trainer_state(o["Key"].rsplit("/", 1)[-1])
    ]
    if files:  # a folder: every file under it, in the same layout
        for f in files:
            store.local_path(f)
        return store.local_path(files[0]).parents[len(Path(files[0]).relative_to(key).parts) - 1]
    if store.exists(key):
        return store.local_path(key)
    raise InputError(f"model {uri} does not exist (no object and no folder of that name); check the URI")


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            revision=revision,
            etag_timeout=10,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"],
        )
    except Exception as exc:  # noqa: BLE001 -- the hub's errors are many; all mean "not available here"
        reason = type(exc).__name__
        raise InputError(
            f"model '{repo_id}' is not a local path and the Hugging Face Hub could not provide it ({reason}); "
            "download it where the hub is reachable and pass the folder"
        ) from None
    return Path(path)


def fingerprint(path: Path, extra: dict[str, Any] | None = None) -> str:
    """sha256 over the checkpoint's files (relative name + bytes): ingest's cache key."""
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        # hidden files inside the checkpoint do not count; a hidden folder *above* it (./.microscope) must not
        # hide the checkpoint itself (it once did: every checkpoint there had the fingerprint of no files)
        if any(part.startswith(".") for part in rel.split("/")) or is_trainer_state(f.name):
            continue
        h.update(rel.encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()


# bytes per element of each safetensors dtype (the format's own table)
_ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


def check_safetensors(path: Path) -> None:
    """Parse the header and check every tensor against it before any loader does: a known dtype, a shape
    of non-negative ints, offsets that hold exactly shape × dtype bytes, tensors that tile the data without
    gaps or overlaps, and data that fits in the file (truncation, tampering and corruption are named here,
    not deep in a loader)."""
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100_000_000:
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        spans = sorted((_tensor_span(name, v), name) for name, v in header.items() if name != "__metadata__")
        end = 0
        for (begin, stop), name in spans:
            if begin != end:
                raise ValueError(f"tensor {name!r} starts at byte {begin} of the data, not at {end} (a gap or overlap)")
            end = stop
        if 8 + n + end > size:
            raise ValueError(f"data ends at byte {8 + n + end} but the file has {size}")
    except (ValueError, struct.error, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{path} is not a valid safetensors file ({exc}); it is truncated or corrupt, re-save or re-download it"
        ) from None


def _tensor_span(name: str, entry: Any) -> tuple[int, int]:
    """[begin, end) of one tensor's bytes, checked against its dtype and shape."""
    if not isinstance(entry, dict) or entry.get("dtype") not in _ST_DTYPES:
        raise ValueError(
            f"tensor {name!r} has no known dtype ({entry.get('dtype') if isinstance(entry, dict) else entry})"
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} has shape {shape}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
        raise ValueError(f"tensor {name!r} has data_offsets {offsets}, not two byte positions")
    begin, stop = offsets
    want = math.prod(shape) * _ST_DTYPES[entry["dtype"]]
    if stop - begin != want:
        raise ValueError(
            f"tensor {name!r} ({entry['dtype']} {shape}) needs {want} bytes but its offsets [{begin}, {stop}] hold "
            f"{stop - begin}"
        )
    return begin, stop


def read_state_dict(path: Path) -> dict[str, Any]:
    """Tensors from a .safetensors or pickled (.pt/.bin/.pth) state dict, without running code."""
    import torch

    if path.suffix == ".safetensors":
        check_safetensors(path)
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        hint = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise InputError(
            f"refusing to load {path}: it is a pickle that needs arbitrary code to load "
            f"({hint or 'not a plain tensor state dict'}); re-save the weights with safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise InputError(
            f"{path} is not a readable PyTorch state dict ({str(exc).splitlines()[0]}); re-save it"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors; save model.state_dict()")
    return obj


def check_hf_folder(path: Path) -> None:
    """Validate the weight files of an HF folder before transformers sees them."""
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json; pass an HF model folder or a weights file with model.module")
    files = [f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES and not is_trainer_state(f.name)]
    # transformers reads the safetensors where they exist, and only then the .bin files
    weights = [f for f in files if f.suffix == ".safetensors"] or files
    if not weights:
        raise InputError(f"{path} has no weight files (*.safetensors or *.bin); save the model with save_pretrained")
    for f in weights:
        if f.suffix == ".safetensors":
            check_safetensors(f)
        else:
            read_state_dict(f)  # refuses code-carrying pickles before transformers touches them


def preflight(path: Path) -> None:
    """Cheap checks before any model is built: a bad checkpoint fails here, before the pipeline starts."""
    if path.is_dir():
        check_hf_folder(path)
    elif path.suffix == ".safetensors":
        check_safetensors(path)
    else:
        read_state_dict(path)  # mmap'd, so a large file costs little; a code-carrying pickle is refused
