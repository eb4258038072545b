"""Qdrant: layers and SAE features as vectors, searchable across audits.

Local path mode under the workspace by default; a Qdrant server when the settings name one (`QDRANT_URL`). Point ids are
uuid5 of their content, not of the audit: (model digest, the content-addressed artifact the vectors come from, layer
or hook and feature). A second audit of the same weights and config (a re-run) adds its id to the point's `audit_ids`
instead of adding a point, so every hit stands once for its content, and either audit finds it.
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


def _identity(collection: str, p: dict[str, Any]) -> tuple[Any, ...]:
    """What a hit stands for: a layer of some weights; a feature of one SAE (its prefix holds the digest).
    Points indexed per audit before content ids (no `source`) fall back to what they carry."""
    if collection == LAYERS:
        return (p.get("model_digest"), p.get("variant"), p.get("layer"))
    return (p.get("source") or p.get("audit_id"), p.get("hook"), p.get("feature"))


def _audit_ids(p: dict[str, Any]) -> list[str]:
    return list(p.get("audit_ids") or ([p["audit_id"]] if p.get("audit_id") else []))


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

    def _upsert(self, collection: str, audit_id: str, points: list[tuple[str, np.ndarray, dict[str, Any]]]) -> int:
        """Points (id, vector, payload) in batches, each keeping the audits that indexed it before (a re-run
        joins them). A read, then a write: local mode admits one process, so nobody writes in between."""
        from qdrant_client.models import PointStruct

        for lo in range(0, len(points), 512):
            batch = points[lo : lo + 512]
            old = self.client.retrieve(collection, ids=[i for i, _, _ in batch], with_payload=["audit_ids"])
            owners = {str(r.id): _audit_ids(r.payload or {}) for r in old}
            structs = [
                PointStruct(
                    id=pid,
                    vector=vec.tolist(),
                    payload={**payload, "audit_ids": [a for a in owners.get(pid, []) if a != audit_id] + [audit_id]},
                )
                for pid, vec, payload in batch
            ]
            self.client.upsert(collection, points=structs)
        return len(points)

    def add_layers(
        self,
        audit_id: str,
        model_digest: str,
        variant: str,
        rows: list[tuple[str, np.ndarray, dict]],
        *,
        source: str = "",
    ) -> int:
        """One point per (model digest, `source`: the vectors' artifact key, variant, layer)."""
        self._ensure(LAYERS, LAYER_DIM)
        points = [
            (
                _point_id(LAYERS, model_digest, source, variant, layer),
                vec,
                {"model_digest": model_digest, "source": source, "variant": variant, "layer": layer, **extra},
            )
            for layer, vec, extra in rows
        ]
        return self._upsert(LAYERS, audit_id, points)

    def add_features(
        self,
        audit_id: str,
        hook: str,
        w_dec: np.ndarray,
        density: np.ndarray,
        top_tokens: list[list[str]],
        *,
        model_digest: str,
        source: str,
    ) -> int:
        """One point per (`source`: the SAE's content-addressed prefix, hook, feature): its decoder direction."""
        unit = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True).clip(1e-12)
        collection = features_collection(unit.shape[1])
        self._ensure(collection, unit.shape[1])
        points = [
            (
                _point_id(FEATURES, model_digest, source, hook, i),
                unit[i],
                {
                    "model_digest": model_digest,
                    "source": source,
                    "hook": hook,
                    "layer": hook,
                    "feature": i,
                    "density": float(density[i]),
                    "top_tokens": top_tokens[i][:5],
                },
            )
            for i in range(len(unit))
        ]
        return self._upsert(collection, audit_id, points)

    def _lookup(self, collection: str, key: tuple[Any, ...]) -> Any:
        """The point `key` names ((audit, variant, layer) or (audit, hook, feature)): one that audit indexed,
        or one indexed per audit before content ids; None when there is none."""
        from qdrant_client.models import FieldCondition, Filter, MatchValue

        audit_id, where, what = key
        fields = ("variant", "layer") if collection == LAYERS else ("hook", "feature")
        must = [FieldCondition(key="audit_ids", match=MatchValue(value=audit_id))]
        must += [FieldCondition(key=f, match=MatchValue(value=v)) for f, v in zip(fields, (where, what), strict=True)]
        found, _ = self.client.scroll(collection, scroll_filter=Filter(must=must), limit=1, with_vectors=True)
        return (found or self.client.retrieve(collection, ids=[_point_id(*key)], with_vectors=True) or [None])[0]

    def similar(self, collection: str, key: tuple[Any, ...], k: int) -> list[dict[str, Any]]:
        """The k nearest neighbours of the point identified by `key` ((audit, variant, layer) for layers,
        (audit, hook, feature) for features), across all audits, one per content (a layer of some weights, a
        feature of one SAE) however many audits indexed it; each with its score, `audit_ids` (every audit that
        holds it, sorted: audit ids begin with their creation time, so oldest first) and `audit_id`: the first
        of them other than the asking audit when there is one (so the asked point itself names a re-run that
        shares it), else the asking audit."""
        # features live in one collection per decoder width (models of other widths are not comparable);
        # the asked feature's collection is where its neighbours are
        names = [c.name for c in self.client.get_collections().collections]
        family = [c for c in names if c == collection or c.startswith(f"{collection}-d")]
        own = next(((c, p) for c in sorted(family) if (p := self._lookup(c, key)) is not None), None)
        if own is None:
            return []
        where, point = own
        hits: dict[tuple[Any, ...], dict[str, Any]] = {}
        page, offset = max(2 * k, 16), 0
        while len(hits) < k:  # points indexed per audit before content ids may repeat a content: read on
            got = self.client.query_points(
                where, query=point.vector, limit=page, offset=offset, with_payload=True
            ).points
            for h in got:
                p = dict(h.payload or {})
                ident, ids = _identity(collection, p), _audit_ids(p)
                if ident in hits:
                    hits[ident]["audit_ids"] = sorted({*hits[ident]["audit_ids"], *ids})
                else:
                    hits[ident] = {"score": float(h.score), **p, "audit_ids": sorted(ids)}
            if len(got) < page:
                break
            offset += page
        out = list(hits.values())[:k]
        for h in out:
            ids = h["audit_ids"]
            h["audit_id"] = next((a for a in ids if a != key[0]), ids[0] if ids else None)
        return out


def features_collection(dim: int) -> str:
    """The collection of SAE decoder directions of width `dim` (`features` holds indexes made before)."""
    return f"{FEATURES}-d{dim}"


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
