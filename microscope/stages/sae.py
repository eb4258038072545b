"""sae: train an SAE on one traced (layer, hook) dataset, evaluate it, extract its features, save it."""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from schemas.config import AuditConfig, SAEConfig, canonical_hash
from schemas.details import SaeDetails
from schemas.records import StageRecord, StageStatus

from microscope import dataset as ds
from microscope.errors import InputError
from microscope.figures import split
from microscope.sae import features as feat
from microscope.sae import io
from microscope.sae.architectures import build
from microscope.sae.checkpoints import checkpoint_sync, discard_finished
from microscope.sae.data import ShuffledBatches, activation_scale, geometric_median, parquet_chunks, parquet_rows
from microscope.sae.evaluate import downstream, reconstruction
from microscope.stages.inputs import StageInputs
from microscope.stages.runner import compute_unfinished, finished, publish, stage_prefix, timed
from microscope.store import ArtifactStore

VERSION = "3"  # 2: contexts carry per-token activations, each variant's fate; 3: activation histograms
SAMPLE_ROWS = 16384


def config_hash(cfg: AuditConfig, hook: str, trace_hash: str) -> str:
    return canonical_hash(
        {
            "v": VERSION,
            "sae": cfg.sae.model_dump(exclude={"hooks"}),
            "hook": hook,
            "trace": trace_hash,
            "seed": cfg.seed,
        }
    )


def _hyper(c: SAEConfig) -> dict[str, Any]:
    return {
        "topk": {"k": c.k, "aux_k": c.aux_k, "aux_coef": c.aux_coef},
        "batchtopk": {"k": c.k, "aux_k": c.aux_k, "aux_coef": c.aux_coef},
        "relu": {"l1_coef": c.l1_coef, "l1_warmup_steps": c.l1_warmup_steps},
        "jumprelu": {"l0_coef": c.l0_coef, "bandwidth": c.jumprelu_bandwidth},
    }[c.architecture]


@dataclass
class _Plan:
    """One SAE to train: where its data is, how it is normalised, where its files go."""

    hook: str
    chash: str
    prefix: str
    paths: list[Path]
    train: Any
    test: Any
    scale: float
    d_in: int
    d_sae: int
    sae: Any


def run(
    inp: StageInputs,
    trace: StageRecord,
    hook: str,
    variant_traces: dict[str, StageRecord] | None = None,
    progress: bool = True,
) -> StageRecord:
    return run_many(inp, trace, [hook], variant_traces, progress)[hook]


def run_many(
    inp: StageInputs,
    trace: StageRecord,
    hooks: list[str],
    variant_traces: dict[str, StageRecord] | None = None,
    progress: bool = True,
) -> dict[str, StageRecord]:
    """Train the SAEs of `hooks` from one pass over their (row-aligned) datasets; hooks whose SAE is
    already in the store are returned from it."""
    c, store = inp.cfg.sae, inp.store
    ids, _ = ds.read_tokens(store.local_path(inp.ingested.tokens_key or ""))
    n_win = len(ids)
    held = set(range(n_win - max(1, int(round(n_win * c.eval_fraction))), n_win))
    done: dict[str, StageRecord] = {}
    plans: list[_Plan] = []
    for hook in hooks:
        planned = _plan(hook, inp, trace, held)
        if isinstance(planned, StageRecord):
            done[hook] = planned
        else:
            plans.append(planned)
    if plans:  # another run may train them while we wait for the group's lock: theirs are read back then
        fit_inputs = inp.extend(
            _Inputs, trace=trace, ids=ids, held=held, variant_traces=variant_traces, progress=progress
        )
        group = canonical_hash([p.prefix for p in plans])
        records = compute_unfinished(
            store,
            f"sae-group/{group}",
            [p.prefix for p in plans],
            lambda todo: _train([p for p in plans if p.prefix in todo], fit_inputs),
        )
        hook_of = {p.prefix: p.hook for p in plans}
        done |= {hook_of[prefix]: record for prefix, record in records.items()}
    # Now that these SAEs are published, the training checkpoints kept for resuming them can go (and any a
    # killed run left of SAEs published since); a cached run sweeps what a kill before this line left.
    discard_finished(store, _checkpoint_root(inp))
    return done


def _checkpoint_root(inp: StageInputs) -> str:
    """Where fits keep their training checkpoints: one folder per fit, named by the SAEs it trains."""
    return stage_prefix(inp.model_digest, "sae-checkpoints", "").rstrip("/")


@dataclass(frozen=True)
class _Inputs(StageInputs):
    """What every SAE of one `run_many` is trained and described from: the model, its data, the settings."""

    trace: StageRecord
    ids: np.ndarray  # [windows, context] token ids of the dataset
    held: set[int]  # the held-out windows: evaluation, never training
    variant_traces: dict[str, StageRecord] | None
    progress: bool


@dataclass
class _Fit:
    """One finished fit of one or more SAEs: Lightning's result, its steps, its timing, its hooks."""

    result: Any
    steps: int
    times: dict[str, Any]
    trained_with: list[str]


def _train(plans: list[_Plan], inp: _Inputs) -> dict[str, StageRecord]:
    """One fit for all `plans` (one pass over their row-aligned data), then each SAE saved on its own:
    their records, keyed by prefix."""
    times: dict[str, Any] = {}
    with timed(times):
        result, steps = _fit(plans, inp)
    fitted = _Fit(result, steps, times, [p.hook for p in plans])
    return {plan.prefix: _finalize(plan, result.all_curves[i], fitted, inp) for i, plan in enumerate(plans)}


def _fit(plans: list[_Plan], inp: _Inputs) -> tuple[Any, int]:
    """Train the SAEs of `plans` together, resuming from the store's training checkpoint if one is there."""
    from microscope.sae.data import joint_chunks
    from microscope.sae.training import SAEModule, find_lr, fit

    c = inp.cfg.sae
    chunks = plans[0].train if len(plans) == 1 else joint_chunks([p.train for p in plans])
    data = ShuffledBatches(chunks, c.batch_size, c.buffer_tokens, c.epochs, inp.cfg.seed, tuple(p.scale for p in plans))
    steps = data.count()
    module = SAEModule(
        [p.sae for p in plans],
        lr=3e-4 if c.lr == "auto" else float(c.lr),
        dead_window=c.dead_window,
        lr_warmup_steps=c.lr_warmup_steps,
        resample_every=c.resample_every,
    )
    if c.lr == "auto":
        module.lr = find_lr(module, data)
    # Training checkpoints live in the store, so a restarted pod resumes where the killed one stopped.
    members = [p.prefix for p in plans]
    ckpt = f"{_checkpoint_root(inp)}/{canonical_hash(members)}"
    ckpt_dir, sync = checkpoint_sync(inp.store, ckpt, members)
    result = fit(
        module,
        data,
        steps,
        checkpoint_dir=ckpt_dir,
        checkpoint_every=c.checkpoint_every,
        progress=inp.progress,
        callbacks=[sync] if sync else None,
    )
    return result, steps


def _plan(hook: str, inp: StageInputs, trace: StageRecord, held: set[int]) -> _Plan | StageRecord:
    import torch

    cfg, store = inp.cfg, inp.store
    datasets = trace.details.get("datasets", {})
    if hook not in datasets:
        raise InputError(f"sae.hooks: {hook} was not traced; add its layer and hook to trace.layers/trace.hooks")
    c = cfg.sae
    chash = config_hash(cfg, hook, trace.config_hash or "")
    prefix = stage_prefix(inp.model_digest, "sae", chash)
    done = finished(store, prefix)
    if done is not None:
        return done
    paths = [store.local_path(k) for k in datasets[hook]["parts"]]
    train, test = parquet_chunks(paths, held, exclude=True), parquet_chunks(paths, held)
    sample = _sample(train, SAMPLE_ROWS)
    if len(sample) < c.batch_size:
        raise InputError(
            f"sae: {hook} has {len(sample)} training tokens, fewer than sae.batch_size={c.batch_size}; "
            "raise dataset.max_tokens or lower the batch size"
        )
    d_in = sample.shape[1]
    d_sae = c.d_sae or c.expansion * d_in
    from microscope.models.loading import compute_device
    from microscope.quantization import free_bytes
    from microscope.sae.budget import check_fit

    check_fit(c, d_in, len(c.hooks) if c.joint else 1, free_bytes(compute_device()))  # before `build` allocates
    scale = activation_scale(sample)
    torch.manual_seed(cfg.seed)  # the same seed per SAE: joint or alone, each starts from the same weights
    sae = build(c.architecture, d_in, d_sae, **_hyper(c))
    with torch.no_grad():
        init = {
            "geometric_median": lambda: geometric_median(sample[:4096] * scale),
            "mean": lambda: (sample * scale).mean(0),
            "zeros": lambda: np.zeros(d_in),
        }[c.b_dec_init]()
        sae.b_dec.copy_(torch.from_numpy(np.asarray(init)).float())
    return _Plan(hook, chash, prefix, paths, train, test, scale, d_in, d_sae, sae)


def _finalize(plan: _Plan, curves: list[dict[str, float]], fitted: _Fit, inp: _Inputs) -> StageRecord:
    """Save, evaluate and describe one trained SAE; write its manifest last."""
    from microscope.models import loading

    c, store, prefix = inp.cfg.sae, inp.store, plan.prefix
    plan.sae.eval()
    loaded, artifacts = _save_sae(plan, inp)
    metrics_full = reconstruction(loaded.encode, loaded.decode, plan.test(), plan.d_sae)
    density = metrics_full.pop("density")
    hist = metrics_full.pop("density_hist")
    model = loading.load_model(inp.ref, loading.compute_device())
    metrics, undefined = _with_downstream({k: float(v) for k, v in metrics_full.items()}, plan, loaded, model, inp)
    variant_metrics, fate, fate_skipped = _variant_effects(plan, loaded, metrics, inp)
    table = _feature_table(plan, loaded, model, fate, inp)
    artifacts |= _write_features(store, prefix, table, curves, density)
    record = StageRecord(
        stage="sae",
        status=StageStatus.completed,
        config_hash=plan.chash,
        input_digests={"model": inp.model_digest, "trace": inp.trace.config_hash or ""},
        artifacts={**artifacts, "manifest": store.uri_for(f"{prefix}/manifest.json")},
        metrics={
            **metrics,
            "steps": float(fitted.result.steps),
            "lr": float(fitted.result.lr),
            "d_sae": float(plan.d_sae),
        },
        undefined=undefined,
        details=SaeDetails(
            prefix=prefix,
            hook=plan.hook,
            architecture=c.architecture,
            d_in=plan.d_in,
            d_sae=plan.d_sae,
            activation_scale=plan.scale,
            density_hist=hist,
            variants=variant_metrics,
            variant_fate_skipped=fate_skipped,
            resumed_from_step=fitted.result.resumed_from_step,
            train_tokens_per_epoch=fitted.steps * c.batch_size // c.epochs,
            trained_with=fitted.trained_with,
            top_features=_top_features(table, 12),
        ).model_dump(mode="json"),
        **dict(fitted.times),
    )
    return publish(store, prefix, record)


def _save_sae(plan: _Plan, inp: _Inputs) -> tuple[Any, dict[str, str]]:
    """Write the SAE's files to the store; return it as loaded back from them, with their URIs."""
    hook = plan.hook
    with tempfile.TemporaryDirectory() as tmp:
        files = io.save(
            plan.sae,
            Path(tmp) / "sae",
            plan.scale,
            {
                "hook_name": hook,
                "hook_module": inp.trace.details["datasets"][hook]["module"],
                "model_name": inp.arch.class_name,
                "model_digest": inp.model_digest,
                "context_size": int(inp.ids.shape[1]),
                "dataset_digest": inp.dataset_digest,
                "prepend_bos": False,
            },
        )
        loaded = io.load(Path(tmp) / "sae")  # evaluate exactly what was saved: raw-activation weights
        artifacts = {f"sae/{f.name}": inp.store.put_file(f"{plan.prefix}/sae/{f.name}", f) for f in files}
    return loaded, artifacts


def _with_downstream(
    metrics: dict[str, float], plan: _Plan, loaded: Any, model: Any, inp: _Inputs
) -> tuple[dict[str, float], dict[str, str]]:
    """`metrics` plus the model's loss with the SAE spliced in on the held-out windows, split into
    defined figures and the reasons of undefined ones."""
    on_model = copy.deepcopy(loaded).to(next(model.parameters()).device)  # spliced where the model runs
    held_ids = inp.ids[sorted(inp.held)]
    # CE recovered can be undefined (a layer the model does not use): its reason goes to `undefined`.
    return split(
        metrics
        | downstream(
            model,
            inp.trace.details["datasets"][plan.hook]["module"],
            lambda t: on_model(t),
            held_ids,
            inp.cfg.trace.batch_size,
            inp.arch.is_causal and inp.arch.has_unembedding,
        )
    )


def _variant_effects(
    plan: _Plan, loaded: Any, metrics: dict[str, float], inp: _Inputs
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """Per variant: the SAE's reconstruction on its activations (and the shift from full precision), each
    latent's fate, and why a fate was skipped."""
    variant_metrics = {}
    # Each variant's fate per latent (density on its activations, correlation with full precision) is
    # measured on the held-out rows variant_metrics uses: the same tokens for every variant, and the fp
    # density on them is density_eval.npy, so `density[<variant>]` compares with that file.
    fate: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    fate_skipped: dict[str, str] = {}
    held = inp.held
    for name, vt in (inp.variant_traces or {}).items():
        vds = vt.details.get("datasets", {}).get(plan.hook)
        if vds is None:
            continue
        vpaths = [inp.store.local_path(k) for k in vds["parts"]]
        vm = reconstruction(loaded.encode, loaded.decode, parquet_chunks(vpaths, held)(), plan.d_sae)
        variant_metrics[name] = {
            "fvu": vm["fvu"],
            "l0": vm["l0"],
            "fvu_shift": vm["fvu"] - metrics["fvu"],
            "l0_shift": vm["l0"] - metrics["l0"],
        }
        try:
            v_density, corr, _ = feat.variant_fate(
                loaded.encode, _rows_in(plan.paths, held), _rows_in(vpaths, held), plan.d_sae
            )
            fate[name] = (v_density, corr)
        except feat.Misaligned as e:  # the fp and variant traces must hold the same tokens in the same order
            fate_skipped[name] = f"the variant's trace is not row-aligned with full precision's: {e}"
    return variant_metrics, fate, fate_skipped


def _feature_table(
    plan: _Plan, loaded: Any, model: Any, fate: dict[str, tuple[np.ndarray, np.ndarray]], inp: _Inputs
) -> Any:
    """One row per latent: density, mean activation, top contexts, logit effects, each variant's fate."""
    import torch

    from microscope.models import loading

    c, ids = inp.cfg.sae, inp.ids
    tokenizer = loading.load_tokenizer(inp.ref)
    hist = torch.zeros((plan.d_sae, len(feat.HIST_EDGES) - 1), dtype=torch.int64)
    vals, wins, poss, fires, sums = feat.top_activations(
        loaded.encode, parquet_rows(plan.paths), plan.d_sae, c.top_contexts, hist
    )
    all_density = fires / max(1, _rows(plan.paths))
    mean_act = np.divide(sums, fires, out=np.zeros_like(sums), where=fires > 0)
    grid = feat.context_grid(vals, wins, poss, ids.shape[1], c.context_tokens)  # 3 × [d_sae, k, 2span+1]
    token_acts = feat.activations_at(loaded.encode, parquet_rows(plan.paths), *grid)
    ctx = feat.contexts(tokenizer, ids, vals, wins, poss, c.context_tokens, token_acts)
    pos_l = neg_l = None
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        pos_l, neg_l = feat.logit_effects(
            loaded.W_dec.numpy().astype(np.float64),
            out_emb.weight.detach().double().cpu().numpy(),
            tokenizer,
            c.top_logits,
        )
    return feat.table(all_density, mean_act, ctx, pos_l, neg_l, fate, hist.numpy())


def _write_features(
    store: ArtifactStore, prefix: str, table: Any, curves: list[dict[str, float]], density: np.ndarray
) -> dict[str, str]:
    """The feature table, training curves and held-out densities, written to the store: their URIs."""
    import pyarrow.parquet as pq

    tmp_f = store.staging_path(f"{prefix}/features.parquet")
    pq.write_table(table, tmp_f)
    return {
        "features": store.put_file(f"{prefix}/features.parquet", tmp_f, move=True),
        "curves": store.put_json(f"{prefix}/curves.json", curves),
        "density": store.put_bytes(f"{prefix}/density_eval.npy", _npy(density)),
    }


def _sample(chunks: Any, n: int) -> np.ndarray:
    out, got = [], 0
    for chunk in chunks():
        out.append(chunk)
        got += len(chunk)
        if got >= n:
            break
    return np.concatenate(out)[:n] if out else np.zeros((0, 0), np.float32)


def _rows_in(paths: list[Path], windows: set[int]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`parquet_rows` restricted to `windows`, in stored order."""
    keep = np.fromiter(sorted(windows), dtype=np.int64)
    for x, win, pos in parquet_rows(paths):
        mask = np.isin(win, keep)
        if mask.any():
            yield x[mask], win[mask], pos[mask]


def _rows(paths: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def _npy(a: np.ndarray) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _top_features(table: Any, n: int) -> list[dict[str, Any]]:
    """The densest non-dense features with their best contexts: the report's showcase. Contexts keep only
    their text and activation (what the report shows): the per-token lists stay in features.parquet, so
    the record stays small and holds no NaN."""
    rows = table.to_pylist()
    rows = [r for r in rows if 0 < r["density"] <= 0.1 and r["top_contexts"]]
    rows.sort(key=lambda r: -r["top_contexts"][0]["activation"])
    keep = ("feature", "density", "mean_activation", "top_contexts", "top_logits", "bottom_logits")
    per_token = ("tokens", "activations", "center")
    out = []
    for r in rows[:n]:
        row = {k: r.get(k) for k in keep}
        row["top_contexts"] = [{k: v for k, v in c.items() if k not in per_token} for c in r["top_contexts"]]
        out.append(json.loads(json.dumps(row, default=float)))
    return out
