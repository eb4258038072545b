"""trace: the model's activations at the configured (layer, hook) points, into the Parquet cache."""

from __future__ import annotations

import time

from schemas.config import AuditConfig, canonical_hash
from schemas.details import TraceDetails
from schemas.records import StageRecord

from microscope import dataset as ds
from microscope.errors import InputError
from microscope.models import loading
from microscope.quantization import variant_identity
from microscope.stages.inputs import StageInputs
from microscope.stages.runner import StageRun, run_stage, stage_prefix
from microscope.trace import Progress, resolve_layers, resolve_points, trace_to_parquet

VERSION = "1"


def config_hash(cfg: AuditConfig, dataset_digest: str, variant: str = "fp") -> str:
    trace = cfg.trace.model_dump(exclude={"batch_size"})  # batch size changes speed, not results
    return canonical_hash(
        {"v": VERSION, "trace": trace, "dataset": dataset_digest, "variant": variant_identity(cfg.quantize, variant)}
    )


def run(inp: StageInputs, progress: Progress | None = None, variant: str | None = None) -> StageRecord:
    """Trace the full-precision model, or the quantized `variant` (a format name) of it."""
    ref, arch, cfg, store = inp.ref, inp.arch, inp.cfg, inp.store
    model_digest, dataset_digest = inp.model_digest, inp.dataset_digest
    chash = config_hash(cfg, dataset_digest, variant or "fp")
    prefix = stage_prefix(model_digest, "trace", chash)

    def compute(run: StageRun) -> StageRecord:
        layers = resolve_layers(cfg.trace.layers, arch.n_layers)
        points = resolve_points(arch.hook_points, layers, cfg.trace.hooks, arch.family)
        blocks = {p.layer: p.resid for p in arch.hook_points}
        t0 = time.perf_counter()
        if variant is not None:
            from microscope.quantization import load_variant

            model = load_variant(ref, variant, cfg.quantize, loading.compute_device(), inp.calibration)
        else:
            model = loading.load_model(ref, loading.compute_device())
        weights = inp.ingested.weights_digest
        if variant is None and loading.model_digest(model) != weights:
            raise InputError(f"the checkpoint at {ref.source} changed since ingest (digest differs); re-run the audit")
        ids, dids = ds.read_tokens(store.local_path(inp.ingested.tokens_key or ""))
        result = trace_to_parquet(model, ids, dids, points, blocks, cfg.trace, store, prefix, progress)
        seconds = time.perf_counter() - t0
        metrics: dict[str, float] = {
            "tokens": float(ids.size),
            "datasets": float(len(result.datasets)),
            "final_batch_size": float(result.final_batch_size),
            "oom_halvings": float(result.oom_halvings),
        }
        traced = (len(ids) - result.resumed_from_window) * ids.shape[1]  # a resumed trace did only the rest
        undefined: dict[str, str] = {}
        if traced:
            metrics["tokens_per_s"] = traced / seconds
        else:  # no rate without tokens: say why rather than write 0 or NaN
            undefined["tokens_per_s"] = "every window was traced before a restart: this run traced no tokens to time"
        return run.record(
            input_digests={"model": model_digest, "dataset": dataset_digest},
            artifacts={name: store.uri_for(run.key(name)) for name in result.datasets},
            metrics=metrics,
            undefined=undefined,
            details=TraceDetails(
                prefix=run.prefix, datasets=result.datasets, resumed_from_window=result.resumed_from_window
            ),
        )

    return run_stage(store, "trace", prefix, chash, compute, variant)
