"""ingest: load and digest the model, describe it; read, validate, tokenize and pack the dataset."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from schemas.config import AuditConfig, canonical_hash
from schemas.records import Architecture, DatasetSummary, ModelRef, StageRecord, StageStatus

from microscope import dataset as ds
from microscope import images
from microscope.errors import InputError
from microscope.models import loading
from microscope.stages import from_manifest, stage_prefix, timed
from microscope.store import ArtifactStore
from microscope.validation import raise_on_failure, validate_documents

VERSION = "1"


def dataset_fingerprint(path: str | None) -> str:
    """sha256 of the dataset file's bytes (or of its hub name): part of ingest's cache key."""
    if not path:
        raise InputError("no dataset given; pass --dataset PATH or set dataset.path in the config")
    p = Path(path).expanduser()
    if p.is_file():
        with open(p, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.sha256(f"hub:{path}".encode()).hexdigest()


def run(ref: ModelRef, cfg: AuditConfig, store: ArtifactStore) -> StageRecord:
    if images.is_image_dataset(cfg.dataset.path):
        return _run_images(ref, cfg, store)
    times: dict[str, Any] = {}
    with timed(times):
        docs = ds.read_documents(cfg.dataset)
        text_digest = ds.text_digest(docs)
        model = loading.load_model(ref)
        digest = loading.model_digest(model)
        config_hash = canonical_hash(
            {"v": VERSION, "dataset": cfg.dataset.model_dump(), "tokenizer": ref.tokenizer, "text": text_digest}
        )
        prefix = stage_prefix(digest, "ingest", config_hash)
        manifest = store.read_manifest(prefix)
        if manifest is not None:
            return from_manifest(manifest)

        arch = loading.describe(model)
        del model
        tokenizer = loading.load_tokenizer(ref)
        token_lists, n_tokens = ds.token_lengths(docs, tokenizer)
        checks = validate_documents(docs, n_tokens, cfg.dataset)
        raise_on_failure(checks, cfg.dataset.path or "", cfg.dataset)
        packed = ds.pack(token_lists, tokenizer, cfg.dataset)
        if packed.input_ids.shape[0] == 0:
            raise InputError(
                f"dataset {cfg.dataset.path} has {int(n_tokens.sum())} tokens, fewer than one window of "
                f"dataset.seq_len={cfg.dataset.seq_len}; lower seq_len or add text"
            )
        dataset_digest = ds.tokens_digest(packed, type(tokenizer).__name__ + str(tokenizer.vocab_size))
        summary = DatasetSummary(
            source=str(cfg.dataset.path),
            text_digest=text_digest,
            n_documents=len(docs),
            n_tokens=int(packed.input_ids.size),
            n_windows=int(packed.input_ids.shape[0]),
            seq_len=cfg.dataset.seq_len,
            tokens_per_doc_mean=float(n_tokens.mean()) if len(n_tokens) else 0.0,
            tokens_per_doc_max=int(n_tokens.max()) if len(n_tokens) else 0,
            truncated=packed.truncated,
            checks=checks,
        )
        tmp = store.staging_path(f"{prefix}/tokens.parquet")
        ds.write_tokens(packed, tmp)
        artifacts = {
            "tokens": store.put_file(f"{prefix}/tokens.parquet", tmp, move=True),
            "architecture": store.put_json(f"{prefix}/architecture.json", arch.model_dump(mode="json")),
            "dataset": store.put_json(f"{prefix}/dataset.json", summary.model_dump(mode="json")),
        }
    record = StageRecord(
        stage="ingest",
        status=StageStatus.completed,
        config_hash=config_hash,
        input_digests={"model_files": ref.source_fingerprint, "text": text_digest},
        artifacts={**artifacts, "manifest": store.uri_for(f"{prefix}/manifest.json")},
        metrics={
            "n_params": float(arch.n_params),
            "n_layers": float(arch.n_layers),
            "n_documents": float(summary.n_documents),
            "n_tokens": float(summary.n_tokens),
            "n_windows": float(summary.n_windows),
        },
        details={
            "model_digest": digest,
            "dataset_digest": dataset_digest,
            "prefix": prefix,
            "tokens_key": f"{prefix}/tokens.parquet",
        },
        **times,
    )
    store.write_manifest(prefix, {"record": record.model_dump(mode="json")})
    return record


def _run_images(ref: ModelRef, cfg: AuditConfig, store: ArtifactStore) -> StageRecord:
    """An image classifier's dataset: validated, digested and copied into the store (no tokenizer)."""
    import io

    times: dict[str, Any] = {}
    with timed(times):
        x, y = images.read_images(str(cfg.dataset.path))
        digest_xy = images.images_digest(x, y)
        model = loading.load_model(ref)
        digest = loading.model_digest(model)
        config_hash = canonical_hash({"v": VERSION, "images": digest_xy})
        prefix = stage_prefix(digest, "ingest", config_hash)
        manifest = store.read_manifest(prefix)
        if manifest is not None:
            return from_manifest(manifest)
        arch = loading.describe(model)
        del model
        summary = DatasetSummary(
            source=str(cfg.dataset.path),
            text_digest=digest_xy,
            n_documents=len(x),
            n_tokens=0,
            n_windows=len(x),
            seq_len=0,
            tokens_per_doc_mean=0.0,
            tokens_per_doc_max=0,
            truncated=False,
            checks=[],
        )
        buf = io.BytesIO()
        np.savez(buf, x=x, y=y)
        artifacts = {
            "images": store.put_bytes(f"{prefix}/images.npz", buf.getvalue()),
            "architecture": store.put_json(f"{prefix}/architecture.json", arch.model_dump(mode="json")),
            "dataset": store.put_json(f"{prefix}/dataset.json", summary.model_dump(mode="json")),
        }
    record = StageRecord(
        stage="ingest",
        status=StageStatus.completed,
        config_hash=config_hash,
        input_digests={"model_files": ref.source_fingerprint, "images": digest_xy},
        artifacts={**artifacts, "manifest": store.uri_for(f"{prefix}/manifest.json")},
        metrics={
            "n_params": float(arch.n_params),
            "n_layers": float(arch.n_layers),
            "n_images": float(len(x)),
            "n_classes": float(len(np.unique(y))),
        },
        details={
            "model_digest": digest,
            "dataset_digest": digest_xy,
            "prefix": prefix,
            "modality": "images",
            "images_key": f"{prefix}/images.npz",
            "image_shape": list(x.shape[1:]),
        },
        **times,
    )
    store.write_manifest(prefix, {"record": record.model_dump(mode="json")})
    return record


def load_images(record: StageRecord, store: ArtifactStore) -> tuple[np.ndarray, np.ndarray]:
    import io

    with np.load(io.BytesIO(store.get_bytes(record.details["images_key"])), allow_pickle=False) as f:
        return f["x"], f["y"]


def load_outputs(record: StageRecord, store: ArtifactStore) -> tuple[Architecture, DatasetSummary]:
    prefix = record.details["prefix"]
    arch = Architecture.model_validate(store.get_json(f"{prefix}/architecture.json"))
    summary = DatasetSummary.model_validate(store.get_json(f"{prefix}/dataset.json"))
    return arch, summary
