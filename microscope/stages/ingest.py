"""ingest: load and digest the model, describe it; read, validate, tokenize and pack the dataset."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from schemas.config import AuditConfig, canonical_hash
from schemas.details import IngestDetails
from schemas.records import Architecture, DatasetSummary, ModelRef, StageRecord, ValidationCheck

from microscope import dataset as ds
from microscope import images
from microscope.documents import check_unchanged
from microscope.errors import InputError
from microscope.models import loading
from microscope.stages.runner import StageRun, run_stage, stage_prefix
from microscope.store import ArtifactStore
from microscope.validation import raise_on_failure, validate_documents

VERSION = "2"  # 2: model_digest covers config, class and tokenizer, not the weights alone


def dataset_fingerprint(path: str | None) -> str:
    """sha256 of the dataset file's bytes (or of its hub name): part of ingest's cache key."""
    if not path:
        raise InputError("no dataset given; pass --dataset PATH or set dataset.path in the config")
    p = Path(path).expanduser()
    if p.is_file():
        with open(p, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    return hashlib.sha256(f"hub:{path}".encode()).hexdigest()


@dataclass
class _Checkpoint:
    """The loaded model and what ingest records of it: its digests and any non-finite weights."""

    model: Any
    weights: str  # digest of the weights alone
    digest: str  # model_digest: config, class, tokenizer and weights
    nonfinite: dict[str, dict[str, int]]  # tensor → counts of NaN / inf values

    @classmethod
    def load(cls, ref: ModelRef) -> _Checkpoint:
        model = loading.load_model(ref)
        weights = loading.model_digest(model)
        return cls(model, weights, loading.function_digest(model, ref, weights), loading.check_finite(model, ref))


def run(ref: ModelRef, cfg: AuditConfig, store: ArtifactStore) -> StageRecord:
    if images.is_image_dataset(cfg.dataset.path):
        return _run_images(ref, cfg, store)
    scan = ds.scan(cfg.dataset)  # the whole file, streamed: its digest, and any bad byte or record anywhere
    ckpt = _Checkpoint.load(ref)
    chash = canonical_hash(
        {"v": VERSION, "dataset": cfg.dataset.model_dump(), "tokenizer": ref.tokenizer, "text": scan.digest}
    )
    return run_stage(
        store,
        "ingest",
        stage_prefix(ckpt.digest, "ingest", chash),
        chash,
        lambda run: _compute_text(run, ref, cfg, scan, ckpt),
    )


def _compute_text(run: StageRun, ref: ModelRef, cfg: AuditConfig, scan: ds.Scan, ckpt: _Checkpoint) -> StageRecord:
    """A text dataset tokenized, validated and packed into windows, stored beside the model's description."""
    store = run.store
    arch = loading.describe(ckpt.model)
    tokenizer = loading.load_tokenizer(ref)
    read, checks, packed = _read_and_pack(cfg, scan, tokenizer)
    dataset_digest = ds.tokens_digest(packed, type(tokenizer).__name__ + str(tokenizer.vocab_size))
    summary = _text_summary(cfg, scan, read, packed, checks)
    tmp = store.staging_path(run.key("tokens.parquet"))
    ds.write_tokens(packed, tmp)
    return run.record(
        input_digests={"model_files": ref.source_fingerprint, "text": scan.digest},
        artifacts={
            "tokens": store.put_file(run.key("tokens.parquet"), tmp, move=True),
            **_describe(run, arch, summary),
        },
        metrics={
            "n_params": float(arch.n_params),
            "n_layers": float(arch.n_layers),
            "n_documents": float(summary.n_documents),
            "n_tokens": float(summary.n_tokens),
            "n_windows": float(summary.n_windows),
        },
        details=IngestDetails(
            prefix=run.prefix,
            model_digest=ckpt.digest,
            weights_digest=ckpt.weights,
            nonfinite=ckpt.nonfinite,
            dataset_digest=dataset_digest,
            modality="text",
            tokens_key=run.key("tokens.parquet"),
            # every document is read (decoded, digested); tokenizing stops when the windows are full
            documents_read=scan.documents,
            documents_tokenized=len(read.token_lists),
            last_document_cut=read.cut,
        ),
    )


def _read_and_pack(
    cfg: AuditConfig, scan: ds.Scan, tokenizer: Any
) -> tuple[ds.Tokenized, list[ValidationCheck], ds.Packed]:
    """The dataset tokenized up to the token budget, validated (raising on failure), packed into windows."""
    read = ds.tokenize(
        ds.pieces(cfg.dataset), tokenizer, ds.token_budget(tokenizer, cfg.dataset), cfg.dataset.min_doc_tokens
    )
    check_unchanged(cfg.dataset, scan)
    checks = validate_documents(*_checked_documents(read, scan), cfg.dataset)
    raise_on_failure(checks, cfg.dataset.path or "", cfg.dataset)
    packed = ds.pack(read.token_lists, tokenizer, cfg.dataset, more=not read.exhausted)
    if packed.input_ids.shape[0] == 0:
        raise InputError(
            f"dataset {cfg.dataset.path} has {int(read.counts.sum())} tokens, fewer than one window of "
            f"dataset.seq_len={cfg.dataset.seq_len}; lower seq_len or add text"
        )
    return read, checks, packed


def _text_summary(
    cfg: AuditConfig, scan: ds.Scan, read: ds.Tokenized, packed: ds.Packed, checks: list[ValidationCheck]
) -> DatasetSummary:
    """What the report says of the dataset: its source, size in documents, tokens and windows, its checks."""
    return DatasetSummary(
        source=str(cfg.dataset.path),
        text_digest=scan.digest,
        n_documents=scan.documents,
        n_tokens=int(packed.input_ids.size),
        n_windows=int(packed.input_ids.shape[0]),
        seq_len=cfg.dataset.seq_len,
        # over the documents tokenized; one cut at the budget counts the tokens read of it
        tokens_per_doc_mean=float(read.counts.mean()) if len(read.counts) else 0.0,
        tokens_per_doc_max=int(read.counts.max()) if len(read.counts) else 0,
        truncated=packed.truncated,
        checks=checks,
    )


def _checked_documents(read: ds.Tokenized, scan: ds.Scan) -> tuple[list[str | None], np.ndarray]:
    """What validation checks: the documents tokenized (token lengths are known only for them; the rest never
    reach the model) and every record without text in the file, tokenized or not, with 0 tokens as before."""
    unread_nulls = scan.nulls - read.heads.count(None)
    docs = read.heads + [None] * unread_nulls
    return docs, np.concatenate([read.counts, np.zeros(unread_nulls, dtype=np.int64)])


def _describe(run: StageRun, arch: Architecture, summary: DatasetSummary) -> dict[str, str]:
    return {
        "architecture": run.store.put_json(run.key("architecture.json"), arch.model_dump(mode="json")),
        "dataset": run.store.put_json(run.key("dataset.json"), summary.model_dump(mode="json")),
    }


def _run_images(ref: ModelRef, cfg: AuditConfig, store: ArtifactStore) -> StageRecord:
    """An image classifier's dataset: validated, digested and copied into the store (no tokenizer)."""
    import io

    x, y = images.read_images(str(cfg.dataset.path))
    digest_xy = images.images_digest(x, y)
    ckpt = _Checkpoint.load(ref)
    model, weights, digest, bad = ckpt.model, ckpt.weights, ckpt.digest, ckpt.nonfinite
    images.check_fits(model, x, y, str(cfg.dataset.path))  # before the cache: an old record may predate the check
    chash = canonical_hash({"v": VERSION, "images": digest_xy})

    def compute(run: StageRun) -> StageRecord:
        arch = loading.describe(model)
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
        return run.record(
            input_digests={"model_files": ref.source_fingerprint, "images": digest_xy},
            artifacts={
                "images": store.put_bytes(run.key("images.npz"), buf.getvalue()),
                **_describe(run, arch, summary),
            },
            metrics={
                "n_params": float(arch.n_params),
                "n_layers": float(arch.n_layers),
                "n_images": float(len(x)),
                "n_classes": float(len(np.unique(y))),
            },
            details=IngestDetails(
                prefix=run.prefix,
                model_digest=digest,
                weights_digest=weights,
                nonfinite=bad,
                dataset_digest=digest_xy,
                modality="images",
                images_key=run.key("images.npz"),
                image_shape=list(x.shape[1:]),
            ),
        )

    return run_stage(store, "ingest", stage_prefix(digest, "ingest", chash), chash, compute)


def load_outputs(record: StageRecord, store: ArtifactStore) -> tuple[Architecture, DatasetSummary]:
    prefix = record.details["prefix"]
    arch = Architecture.model_validate(store.get_json(f"{prefix}/architecture.json"))
    summary = DatasetSummary.model_validate(store.get_json(f"{prefix}/dataset.json"))
    return arch, summary
