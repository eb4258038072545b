"""Qdrant: layers and SAE features as vectors, searchable across audits.

Local path mode under the workspace by default; a Qdrant server when the settings name one (`QDRANT_URL`). Point ids are
uuid5 of their identity, so re-indexing an audit overwrites instead of duplicating.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np

from microscope.figures import is_number
from microscope.settings import get_settings

LAYERS, FEATURES = "layers", "features"
SPECTRUM_BINS = np.linspace(-6, 0, 25)  # log10(σ / σmax)
LAYER_DIM = 8 + len(SPECTRUM_BINS) - 1


def layer_embedding(stats: dict[str, Any], fit: dict[str, float]) -> np.ndarray:
    """A fixed-length, scale-aware description of one weight matrix: log norms, ranks relative to the
    matrix size, conditioning, sparsity, the power-law α, and the shape of its log-spectrum."""
    sv = np.asarray(stats["singular_values"], dtype=np.float64)
    m = min(stats["shape"])
    rel = np.log10(np.clip(sv / max(sv[0], 1e-300), 1e-12, None))
    hist, _ = np.histogram(rel, bins=SPECTRUM_BINS)
    alpha, cond = fit.get("alpha"), stats["condition_number"]
    head = [
        np.log10(stats["frobenius"] + 1e-12),
        np.log10(stats["spectral_norm"] + 1e-12),
        np.log10(cond) / 12 if is_number(cond) else np.nan,  # undefined (randomized path): the model's mean
        stats["effective_rank"] / m,
        stats["stable_rank"] / m,
        stats["sparsity"],
        (alpha if is_number(alpha) else 0.0) / 10,
        np.log10(stats["l1"] / (stats["shape"][0] * stats["shape"][1]) + 1e-12),
    ]
    return np.concatenate([head, hist / max(hist.sum(), 1)]).astype(np.float32)


HEAD = 8  # the statistics part of a layer embedding; the rest is the log-spectrum histogram


def standardise_layers(vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """z-scores the statistics part of every layer embedding across the model's matrices, so a layer is
    described relative to its model (its norms and ranks in standard deviations from the model's mean),
    and scales the spectrum histogram to the same unit norm; raw statistics of one model are so alike
    that their cosine similarities all sit near 1."""
    if not vectors:
        return {}
    names = sorted(vectors)
    head = np.stack([vectors[n][:HEAD] for n in names]).astype(np.float64)
    if np.isnan(head).any():  # an undefined statistic sits at the model's mean (z = 0), never NaN in Qdrant
        seen = np.isfinite(head).any(axis=0)
        mean = np.nanmean(np.where(seen, head, 0.0), axis=0)
        head = np.where(np.isnan(head), mean, head)
    std = head.std(axis=0)
    z = (head - head.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
    out = {}
    for n, zi in zip(names, z, strict=True):
        hist = vectors[n][HEAD:].astype(np.float64)
        hist = hist / max(float(np.linalg.norm(hist)), 1e-12) * np.sqrt(HEAD)
        out[n] = np.concatenate([zi, hist]).astype(np.float32)
    return out


def _point_id(*parts: Any) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "microscope/" + "/".join(str(p) for p in parts)))


class VectorIndex:
    def __init__(self, url: str | None = None, path: str | None = None):
        from qdrant_client import QdrantClient

        s = get_settings()
        url = url or s.qdrant_url
        if url:
            key = s.qdrant_api_key.get_secret_value() if s.qdrant_api_key else None
            self.client = QdrantClient(url=url, api_key=key)
        else:
            where = path or str(s.qdrant_dir)
            os.makedirs(where, exist_ok=True)
            self.client = QdrantClient(path=where)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _ensure(self, name: str, dim: int) -> None:
        from qdrant_client.models import Distance, VectorParams

        if not self.client.collection_exists(name):
            self.client.create_collection(name, vectors_config=VectorParams(size=dim, distance=Distance.COSINE))

    def add_layers(
        self, audit_id: str, model_digest: str, variant: str, rows: list[tuple[str, np.ndarray, dict]]
    ) -> int:
        from qdrant_client.models import PointStruct

        self._ensure(LAYERS, LAYER_DIM)
        points = [
            PointStruct(
                id=_point_id(audit_id, variant, layer),
                vector=vec.tolist(),
                payload={
                    "audit_id": audit_id,
                    "model_digest": model_digest,
                    "variant": variant,
                    "layer": layer,
                    **extra,
                },
            )
            for layer, vec, extra in rows
        ]
        self.client.upsert(LAYERS, points=points)
        return len(points)

    def add_features(
        self, audit_id: str, hook: str, w_dec: np.ndarray, density: np.ndarray, top_tokens: list[list[str]]
    ) -> int:
        from qdrant_client.models import PointStruct

        unit = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True).clip(1e-12)
        self._ensure(FEATURES, unit.shape[1])
        points = [
            PointStruct(
                id=_point_id(audit_id, hook, i),
                vector=unit[i].tolist(),
                payload={
                    "audit_id": audit_id,
                    "hook": hook,
                    "layer": hook,
                    "feature": i,
                    "density": float(density[i]),
                    "top_tokens": top_tokens[i][:5],
                },
            )
            for i in range(len(unit))
        ]
        for lo in range(0, len(points), 512):
            self.client.upsert(FEATURES, points=points[lo : lo + 512])
        return len(points)

    def similar(self, collection: str, key: tuple[Any, ...], k: int) -> list[dict[str, Any]]:
        """Nearest neighbours of the point identified by `key` ((audit, variant, layer) for layers,
        (audit, hook, feature) for features), across all audits; each with its score."""
        if not self.client.collection_exists(collection):
            return []
        found = self.client.retrieve(collection, ids=[_point_id(*key)], with_vectors=True)
        if not found:
            return []
        hits = self.client.query_points(collection, query=found[0].vector, limit=k, with_payload=True).points
        return [{"score": float(h.score), **(h.payload or {})} for h in hits]


def reader_index(copy_to: str) -> VectorIndex | None:
    """An index for a process that only reads (the viewer): the Qdrant server when the settings name one;
    else a snapshot, a copy of the local-mode folder in `copy_to` (local mode admits one process, so the
    viewer never opens the folder an audit writes to). None when no audit has indexed anything yet."""
    import shutil

    s = get_settings()
    if s.qdrant_url:
        return VectorIndex(url=s.qdrant_url)
    src = s.qdrant_dir
    if not (src / "collection").is_dir():
        return None
    shutil.rmtree(copy_to, ignore_errors=True)
    shutil.copytree(src, copy_to, ignore=shutil.ignore_patterns(".lock"))
    return VectorIndex(path=copy_to)


def local_version() -> float | None:
    """When the local-mode folder last changed (the newest file's mtime): a snapshot older than this is
    stale. None with a server (always current) or without a folder."""
    s = get_settings()
    if s.qdrant_url or not s.qdrant_dir.is_dir():
        return None
    return max((p.stat().st_mtime for p in s.qdrant_dir.rglob("*") if p.is_file()), default=0.0)
