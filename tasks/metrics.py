from __future__ import annotations

from typing import Any

from microscope.stages import metrics
from microscope.store import open_store
from prefect import task
from prefect.cache_policies import NO_CACHE
from schemas.config import AuditConfig
from schemas.records import StageRecord
from schemas.stages import IngestOutput

from tasks.common import RETRIES, RETRY_DELAYS, cache_key, retry_transient, stage_inputs, stage_options


def _shard_key(_ctx: Any, p: dict[str, Any]) -> str:
    return cache_key(
        "metrics-weights",
        model=p["ing"].model_digest,
        config=metrics.shard_hash(p["cfg"]),
        shard=p["shard"],
        store=p["store_uri"],
    )


@task(cache_key_fn=_shard_key, task_run_name="weights-{shard}", **stage_options("metrics"))
def weights_task(ing: IngestOutput, cfg: AuditConfig, store_uri: str, shard: int) -> StageRecord:
    """Spectra and statistics of one shard of the model's matrices."""
    return metrics.run_shard(stage_inputs(ing, cfg, store_uri), shard)


def _key(_ctx: Any, p: dict[str, Any]) -> str:
    ing: IngestOutput = p["ing"]
    traces = {"fp": p["trace"].config_hash or ""} if p.get("trace") else {}
    traces |= {k: v.config_hash or "" for k, v in (p.get("variant_traces") or {}).items()}
    traces |= {f"audit:{k}": v.config_hash or "" for k, v in (p.get("compare") or {}).items()}
    return cache_key(
        "metrics",
        model=ing.model_digest,
        config=metrics.config_hash(p["cfg"], ing.dataset_digest, traces),
        shards=[s.config_hash for s in p["shards"]],
        store=p["store_uri"],
    )


@task(cache_key_fn=_key, **stage_options("metrics"))
def metrics_task(
    ing: IngestOutput,
    cfg: AuditConfig,
    store_uri: str,
    shards: list[StageRecord],
    trace: StageRecord | None = None,
    variant_traces: dict[str, StageRecord] | None = None,
    compare: dict[str, StageRecord] | None = None,
) -> StageRecord:
    """The shards joined, anomaly flags, loss sensitivity and CKA."""
    return metrics.run(stage_inputs(ing, cfg, store_uri), shards, trace, variant_traces, compare)


TOP_TOKENS = 5  # a feature's strongest contexts' tokens in its Qdrant payload


def _top_tokens(contexts: Any, k: int) -> list[list[str]]:
    """The token of each feature's first k contexts, in Arrow (to_pylist of the whole nested column costs
    seconds at a few thousand features)."""
    import numpy as np
    import pyarrow.compute as pc

    first = pc.list_slice(contexts.combine_chunks(), 0, k)
    flat = pc.struct_field(pc.list_flatten(first), "token").to_pylist()
    ends = np.cumsum(pc.list_value_length(first).fill_null(0).to_numpy(zero_copy_only=False))
    return [flat[a:b] for a, b in zip(np.r_[0, ends[:-1]], ends, strict=True)]


@task(
    name="qdrant-index",
    cache_policy=NO_CACHE,
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_transient,
)
def index_task(
    audit_id: str, model_digest: str, metrics_rec: StageRecord | None, saes: dict[str, StageRecord], store_uri: str
) -> dict[str, int]:
    """Every audit's layers and SAE features into Qdrant (per audit: cached stages are indexed too, the audit
    joining the points of the same content)."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from microscope.sae import io as sae_io
    from microscope.vectors import VectorIndex

    store = open_store(store_uri)
    counts = {"layers": 0, "features": 0}
    with VectorIndex() as index:
        if metrics_rec is not None:
            vecs = np.load(io.BytesIO(store.get_bytes(metrics_rec.details["vectors_key"])))
            layers = {r["name"].replace("/", "_"): r for r in metrics_rec.details["weights"]}
            rows = [
                (
                    name,
                    vecs[name],
                    {"block": layers[name]["layer"], "alpha": layers[name]["alpha"], "flags": layers[name]["flags"]},
                )
                for name in vecs.files
            ]
            source = metrics_rec.details["vectors_key"]  # content-addressed: the same weights and config, one point
            counts["layers"] = index.add_layers(audit_id, model_digest, "fp", rows, source=source)
        for hook, rec in saes.items():
            if rec.status.value == "failed":
                continue
            for name in ("cfg.json", "sae_weights.safetensors"):  # local files (downloads from S3)
                folder = store.local_path(f"{rec.details['prefix']}/sae/{name}").parent
            loaded = sae_io.load(folder)
            feats = pq.read_table(
                store.local_path(rec.details["prefix"] + "/features.parquet"), columns=["density", "top_contexts"]
            )
            counts["features"] += index.add_features(
                audit_id,
                hook,
                loaded.W_dec.numpy(),
                feats["density"].to_numpy(),
                _top_tokens(feats["top_contexts"], TOP_TOKENS),
                model_digest=model_digest,
                source=rec.details["prefix"],
            )
    return counts
