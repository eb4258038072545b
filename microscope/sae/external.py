"""SAEs trained elsewhere: read one saved in SAELens' layout (`cfg.json` + `sae_weights.safetensors`) and
attach it to an audited model, described on the audit's traced activations as the sae stage describes its
own (the same features table, contexts, reconstruction and downstream figures).

SAELens' encode is `act((x − b_dec·apply_b_dec_to_input) @ W_enc + b_enc)`; ours always subtracts b_dec, so
weights are folded on reading: without `apply_b_dec_to_input`, b_enc += b_dec @ W_enc; a TopK SAE with
`rescale_acts_by_decoder_norm` scales its pre-activations by ‖W_dec‖ and divides them out on decoding, so
W_enc, b_enc ·= ‖W_dec‖ and W_dec /= ‖W_dec‖; JumpReLU's `relu(pre)·(pre > θ)` is `pre·(pre > max(θ, 0))`.
The folded files are what the store keeps under `sae/` (SAELens still reads them); the originals go to
`source/`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas.records import StageRecord, StageStatus

from microscope.errors import InputError
from microscope.sae.io import LoadedSAE

if TYPE_CHECKING:
    import torch

    from microscope.store import ArtifactStore

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
VERSION = "1"
# SAELens architecture -> ours (the name SaeDetails.architecture and `io.rebuild` use).
SUPPORTED = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def read_saelens(folder: Path) -> LoadedSAE:
    """The SAE SAELens saved in `folder`, with weights folded so that `encode`/`decode` equal SAELens'."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [n for n in (CFG, WEIGHTS) if not (folder / n).is_file()]
    if missing:
        raise InputError(f"{folder} is no SAELens SAE folder: {' and '.join(missing)} missing")
    try:
        src = json.loads((folder / CFG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{folder / CFG} is not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(src, dict):
        raise InputError(f"{folder / CFG} holds no SAELens config (a JSON object)")
    cfg = _normalized_cfg(src, folder)
    try:
        w = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{folder / WEIGHTS} is unreadable as safetensors ({str(e).splitlines()[0]})") from None
    return LoadedSAE(_export_cfg(cfg, src, folder), _folded(w, cfg, folder))


def _normalized_cfg(src: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The fields encode depends on, from a SAELens 6 config or an older one (SAELens' own defaults)."""
    where = folder / CFG
    arch = src.get("architecture", "standard")  # SAELens < 6 wrote none: standard (handle_pre_6_0_config)
    k = src.get("k")
    if src.get("activation_fn", src.get("activation_fn_str")) == "topk":  # SAELens < 6 kept k in the kwargs
        arch, k = "topk", (src.get("activation_fn_kwargs") or {}).get("k", k)
    if arch not in SUPPORTED:
        raise InputError(f"{where}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED)}")
    for name in ("d_in", "d_sae"):
        if not isinstance(src.get(name), int) or isinstance(src.get(name), bool) or src[name] < 1:
            raise InputError(f"{where}: {name} must be a positive integer, got {src.get(name)!r}")
    norm = src.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise InputError(
            f"{where}: normalize_activations {norm!r} is not supported (only none); fold the normalization into "
            "the weights first (SAELens: fold_activation_norm_scaling_factor) and save with none"
        )
    if src.get("reshape_activations", "none") not in ("none", None):
        raise InputError(f"{where}: reshape_activations {src['reshape_activations']!r} (hook_z SAEs) is not supported")
    if src.get("finetuning_scaling_factor"):
        raise InputError(f"{where}: finetuning_scaling_factor SAEs (SAELens < 6) are not supported")
    if arch == "topk" and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= src["d_sae"]):
        raise InputError(f"{where}: a topk SAE needs an integer k from 1 to d_sae={src['d_sae']}, got {k!r}")
    meta = src.get("metadata") if isinstance(src.get("metadata"), dict) else {}
    return {
        "architecture": arch,
        "d_in": src["d_in"],
        "d_sae": src["d_sae"],
        "k": k,
        "apply_b_dec_to_input": bool(src.get("apply_b_dec_to_input", True)),
        "rescale": arch == "topk" and bool(src.get("rescale_acts_by_decoder_norm", False)),
        "hook_name": meta.get("hook_name") or src.get("hook_name") or src.get("hook_point"),
    }


def _folded(w: dict[str, torch.Tensor], cfg: dict[str, Any], folder: Path) -> dict[str, torch.Tensor]:
    """Float32 weights for our encode (see the module docstring), after checking names and shapes."""
    import torch

    where, d_in, d_sae = folder / WEIGHTS, cfg["d_in"], cfg["d_sae"]
    if cfg["architecture"] == "jumprelu" and "threshold" not in w and "log_threshold" in w:
        w = {k: v for k, v in w.items() if k != "log_threshold"} | {"threshold": w["log_threshold"].exp()}
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if cfg["architecture"] == "jumprelu":
        shapes["threshold"] = (d_sae,)
    lacking = [k for k in shapes if k not in w]
    extra = sorted(set(w) - set(shapes))
    if lacking or extra:
        wrong = [f"missing {', '.join(lacking)}"] * bool(lacking) + [f"unexpected {', '.join(extra)}"] * bool(extra)
        raise InputError(f"{where}: a {cfg['architecture']} SAE holds {', '.join(shapes)}; {'; '.join(wrong)}")
    for name, shape in shapes.items():
        if tuple(w[name].shape) != shape:
            raise InputError(
                f"{where}: {name} is {list(w[name].shape)}, expected {list(shape)} (cfg.json: d_in={d_in}, "
                f"d_sae={d_sae})"
            )
    # folded in float64 so that folding adds no error beyond float32's rounding of the result
    out = {k: w[k].to(torch.float64) for k in shapes}
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{where}: {', '.join(bad)} hold NaN or infinite values")
    if not cfg["apply_b_dec_to_input"]:  # SAELens does not subtract b_dec: add back what ours subtracts
        out["b_enc"] = out["b_enc"] + out["b_dec"] @ out["W_enc"]
    if cfg["rescale"]:  # topk on pre·‖W_dec‖, decoding acts/‖W_dec‖: both folded into the weights
        norm = out["W_dec"].norm(dim=-1)  # [d_sae]
        out["W_enc"], out["b_enc"] = out["W_enc"] * norm, out["b_enc"] * norm
        out["W_dec"] = out["W_dec"] / norm[:, None]
    if "threshold" in out:  # relu(pre)·(pre > θ) = pre·(pre > max(θ, 0))
        out["threshold"] = out["threshold"].clamp(min=0)
    return {k: v.float().contiguous() for k, v in out.items()}


def _export_cfg(cfg: dict[str, Any], src: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Our cfg.json for the folded weights: a SAELens 6 config (SAELens reads it back) that io.load reads."""
    ours = SUPPORTED[cfg["architecture"]]
    out: dict[str, Any] = {
        "architecture": cfg["architecture"],
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            **(src.get("metadata") if isinstance(src.get("metadata"), dict) else {}),
            "microscope_architecture": ours,
            "activation_scale": 1.0,
            "hyperparameters": {"k": cfg["k"]} if ours == "topk" else {},
            "imported_from": str(folder.resolve()),
        },
    }
    if ours == "topk":
        out["k"] = cfg["k"]
        out["rescale_acts_by_decoder_norm"] = False
    return out


def attach(store: ArtifactStore, audit_id: str, hook: str, folder: Path) -> StageRecord:
    """Import the SAELens SAE in `folder` onto `hook` of audit `audit_id`: its files copied into the store, its
    features described on the audit's traced activations, its record saved in the audit's `saes` under
    `record_key` (the hook, or `{hook}@import` when the audit trained its own SAE there)."""
    from microscope import audits

    folder = Path(folder)
    record = audits.load(store, audit_id)
    trace = record.stages.get("trace")
    datasets = (trace.details.get("datasets") or {}) if trace is not None else {}
    if trace is None or trace.status != StageStatus.completed or hook not in datasets:
        traced = ", ".join(datasets) or "nothing"
        raise InputError(
            f"audit {record.audit_id} did not trace {hook} (traced: {traced}); run an audit whose trace.layers/"
            "trace.hooks include it"
        )
    if not record.model_digest or "ingest" not in record.stages or record.architecture is None:
        raise InputError(f"audit {record.audit_id} has no ingest record; run its ingest and trace stages first")
    sae = read_saelens(folder)
    width = datasets[hook].get("d") or _traced_width(store, datasets[hook]["parts"])
    if sae.cfg["d_in"] != width:
        raise InputError(
            f"the SAE in {folder} reads d_in={sae.cfg['d_in']} but {hook} of audit {record.audit_id} is "
            f"{width} wide; import an SAE trained on this model's {hook}"
        )
    from schemas.config import canonical_hash

    from microscope.stages.runner import compute_unfinished, stage_prefix

    weights_sha = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    # keyed by the weights and by the activations they are described on: the same SAE on another audit
    # of this model (another dataset) gets its own features table
    chash = canonical_hash({"v": VERSION, "weights": weights_sha, "cfg": sae.cfg, "trace": trace.config_hash})
    prefix = stage_prefix(record.model_digest, "sae-import", chash)
    rec = compute_unfinished(
        store,
        f"sae-import/{chash}",
        [prefix],
        lambda _todo: {prefix: _describe(store, record, hook, folder, sae, chash, prefix, weights_sha)},
    )[prefix]
    key = record_key(record, hook)
    record.saes[key] = rec
    audits.save(store, record)
    return rec


def record_key(record: Any, hook: str) -> str:
    """Where an import onto `hook` goes in `record.saes`: the hook itself unless the audit trained an SAE
    there (kept: its key stays the hook), then `{hook}@import`. A new import replaces an earlier one."""
    own = record.saes.get(hook)
    return hook if own is None or own.details.get("imported") else f"{hook}@import"


def _traced_width(store: ArtifactStore, parts: list[str]) -> int:
    """The width of a traced dataset whose record does not say it (older traces)."""
    from microscope.sae.data import parquet_chunks

    for chunk in parquet_chunks([store.local_path(k) for k in parts])():
        return int(chunk.shape[1])
    raise InputError(f"the traced dataset {parts[0] if parts else '(none)'} holds no activations")


def _describe(
    store: ArtifactStore,
    record: Any,
    hook: str,
    folder: Path,
    sae: LoadedSAE,
    chash: str,
    prefix: str,
    weights_sha: str,
) -> StageRecord:
    """Save the SAE under `prefix` and describe it as the sae stage describes its own: reconstruction on the
    held-out windows, downstream loss with it spliced in, per-variant effects, the features table."""
    import numpy as np
    from schemas.config import AuditConfig
    from schemas.details import SaeDetails

    from microscope import dataset as ds
    from microscope.models import loading
    from microscope.sae import io
    from microscope.sae.data import parquet_chunks
    from microscope.sae.evaluate import reconstruction
    from microscope.stages import sae as stage  # its private helpers: one way to describe an SAE, not two
    from microscope.stages.inputs import StageInputs
    from microscope.stages.runner import publish, timed

    times: dict[str, Any] = {}
    with timed(times):
        cfg = AuditConfig.model_validate(record.config)
        trace = record.stages["trace"]
        base = StageInputs(record.model, record.stages["ingest"], record.architecture, cfg, store)
        ids, _ = ds.read_tokens(store.local_path(base.ingested.tokens_key or ""))
        n_win = len(ids)  # the held-out windows exactly as stages.sae.run_many chooses them
        held = set(range(n_win - max(1, int(round(n_win * cfg.sae.eval_fraction))), n_win))
        variants = {f: v["trace"] for f, v in record.variants.items() if _completed(v.get("trace"))}
        inp = base.extend(stage._Inputs, trace=trace, ids=ids, held=held, variant_traces=variants, progress=False)
        paths = [store.local_path(k) for k in trace.details["datasets"][hook]["parts"]]
        d_in, d_sae = sae.cfg["d_in"], sae.cfg["d_sae"]
        plan = stage._Plan(hook, chash, prefix, paths, None, parquet_chunks(paths, held), 1.0, d_in, d_sae, None)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "sae"
            out.mkdir()
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, out / WEIGHTS)
            (out / CFG).write_text(json.dumps(sae.cfg, indent=2, sort_keys=True))
            loaded = io.load(out)  # described exactly as saved
            artifacts = {f"sae/{n}": store.put_file(f"{prefix}/sae/{n}", out / n) for n in (WEIGHTS, CFG)}
        artifacts |= {f"source/{n}": store.put_file(f"{prefix}/source/{n}", folder / n) for n in (CFG, WEIGHTS)}
        full = reconstruction(loaded.encode, loaded.decode, plan.test(), d_sae)
        density, hist = full.pop("density"), full.pop("density_hist")
        model = loading.load_model(inp.ref, loading.compute_device())
        metrics, undefined = stage._with_downstream({k: float(v) for k, v in full.items()}, plan, loaded, model, inp)
        variant_metrics, fate, fate_skipped = stage._variant_effects(plan, loaded, metrics, inp)
        table = stage._feature_table(plan, loaded, model, fate, inp)
        artifacts |= stage._write_features(store, prefix, table, [], np.asarray(density))
    src_cfg = json.loads((folder / CFG).read_text())
    details = SaeDetails(
        prefix=prefix,
        hook=hook,
        architecture=sae.cfg["metadata"]["microscope_architecture"],
        d_in=d_in,
        d_sae=d_sae,
        activation_scale=1.0,
        density_hist=hist,
        variants=variant_metrics,
        variant_fate_skipped=fate_skipped,
        resumed_from_step=0,
        train_tokens_per_epoch=0,
        trained_with=[],
        top_features=stage._top_features(table, 12),
    ).model_dump(mode="json")
    # SaeDetails has no field for these yet (extra keys are forbidden there): the import's provenance
    details["imported"] = {"source": str(folder.resolve()), "weights_sha256": weights_sha, "saelens_cfg": src_cfg}
    record_ = StageRecord(
        stage="sae",
        status=StageStatus.completed,
        config_hash=chash,
        input_digests={"model": record.model_digest, "trace": trace.config_hash or "", "weights": weights_sha},
        artifacts={**artifacts, "manifest": store.uri_for(f"{prefix}/manifest.json")},
        metrics={**metrics, "d_sae": float(d_sae)},
        undefined=undefined,
        details=details,
        **dict(times),
    )
    return publish(store, prefix, record_)


def _completed(r: StageRecord | None) -> bool:
    return r is not None and r.status == StageStatus.completed


def summary(store: ArtifactStore, audit_id: str, key: str) -> dict[str, Any]:
    """What `microscope sae import` prints: the record key, the SAE's figures, its features at a glance."""
    from microscope import audits, results

    record = audits.load(store, audit_id)
    r = record.saes[key]
    df = results.features(store, record, key)
    density = df["density"].to_numpy() if len(df) else []
    return {
        "audit": record.audit_id,
        "key": key,
        "hook": r.details["hook"],
        "architecture": r.details["architecture"],
        "d_in": r.details["d_in"],
        "d_sae": r.details["d_sae"],
        "prefix": r.details["prefix"],
        "metrics": r.metrics,
        "undefined": r.undefined,
        "features": {
            "count": int(len(df)),
            "dead": int(sum(1 for d in density if d == 0)),
            "dense": int(sum(1 for d in density if d > 0.1)),
            "median_density": float(sorted(density)[len(density) // 2]) if len(density) else None,
        },
        "top_features": [
            {"feature": f["feature"], "density": f["density"], "context": _ctx(f)}
            for f in r.details["top_features"][:5]
        ],
    }


def _ctx(f: dict[str, Any]) -> str | None:
    c = (f.get("top_contexts") or [None])[0]
    return f"{c['left']}[{c['token']}]{c['right']}" if c else None
