"""robustness: clean accuracy, the reference AutoAttack per norm, and our PGD/FGSM/noise ε-sweeps, on the
same samples and seeds for full precision and every quantized variant; for text models with SAEs, the
features whose activations move most under attack."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.config import AuditConfig, canonical_hash
from schemas.details import RobustnessDetails
from schemas.records import Architecture, StageRecord

from microscope.errors import InputError
from microscope.figures import split
from microscope.modality import open_data
from microscope.models import loading
from microscope.quantization import variant_identity
from microscope.robustness import summary
from microscope.stages.inputs import StageInputs
from microscope.stages.runner import StageRun, run_stage, stage_prefix
from microscope.store import ArtifactStore

VERSION = "2"  # 2: the AutoAttack library version in the results


def config_hash(cfg: AuditConfig, dataset_digest: str, variant: str, saes: dict[str, str]) -> str:
    rob = cfg.robustness.model_dump(exclude={"batch_size"}) | {"eps": dict(sorted(cfg.robustness.eps.items()))}
    return canonical_hash(
        {
            "v": VERSION,
            "robustness": rob,
            "quantize": cfg.quantize.model_dump() if variant != "fp" else None,
            "dataset": dataset_digest,
            "variant": variant_identity(cfg.quantize, variant),
            "saes": dict(sorted(saes.items())),
            "seed": cfg.seed,
        }
    )


@dataclass(frozen=True)
class _Job(StageInputs):
    """One robustness evaluation: the checkpoint (or one of its variants), its data and settings, the SAEs
    whose features it follows, and where to report progress."""

    variant: str
    saes: dict[str, StageRecord]
    progress: Callable[[int, int], None] | None


class _Steps:
    """Counts finished attack steps (one per AutoAttack norm, then one per sweep ε) for `progress`."""

    def __init__(self, total: int, progress: Callable[[int, int], None] | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def tick(self, _msg: str = "") -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)


def run(
    inp: StageInputs,
    variant: str = "fp",
    saes: dict[str, StageRecord] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StageRecord:
    saes = {h: r for h, r in (saes or {}).items() if r.status.value != "failed"} if variant == "fp" else {}
    chash = config_hash(inp.cfg, inp.dataset_digest, variant, {h: r.config_hash or "" for h, r in saes.items()})
    prefix = stage_prefix(inp.model_digest, "robustness", chash)
    job = inp.extend(_Job, variant=variant, saes=saes, progress=progress)
    return run_stage(
        inp.store,
        "robustness",
        prefix,
        chash,
        lambda run: _compute(run, job),
        variant=None if variant == "fp" else variant,
    )


def _compute(run: StageRun, job: _Job) -> StageRecord:
    from microscope.robustness.attacks import sweep
    from microscope.robustness.surfaces import DEFAULT_EPS

    cfg, rc, store = job.cfg, job.cfg.robustness, job.store
    data = open_data(job.ingest, store)
    surface = _frozen_surface(job, data)
    x, y, label, index = data.attack_inputs(surface, cfg)
    eps = DEFAULT_EPS[surface.kind] | rc.eps
    steps = _Steps(len(rc.norms) + len(rc.sweep), job.progress)
    aa_results = _autoattacks(run, job, surface, x, y, eps, steps)
    curves, adv = sweep(
        surface, x, y, list(rc.sweep), rc.pgd_steps, rc.pgd_restarts, cfg.seed, rc.batch_size, steps.tick
    )
    curves["eps_units"] = [surface.to_units(e) for e in rc.sweep]
    shifts = (
        feature_shifts(surface, x, adv, job.saes, store, rc.feature_shifts)
        if job.saes and adv is not None and data.activations and rc.feature_shifts
        else {}
    )
    layers = layer_shifts(surface, x, adv, job.arch, cfg) if adv is not None and data.activations else {}
    results = {
        "variant": job.variant,
        "surface": surface.kind,
        "label": label,
        "samples": index,
        "eps": eps,
        "autoattack": aa_results,
        "curves": curves,
        "feature_shifts": shifts,
        "layer_shifts": layers,
    }
    artifacts = {"results": store.put_json(f"{run.prefix}/results.json", results)}
    # Accuracy under attack is undefined (with its reason) when the model gets no sample right.
    metrics, undefined = split(summary.figures(curves, aa_results, len(x)))
    return run.record(
        input_digests={"model": job.model_digest, "dataset": job.dataset_digest},
        artifacts=artifacts,
        metrics=metrics,
        undefined=undefined,
        details=RobustnessDetails(prefix=run.prefix, **{k: v for k, v in results.items() if k != "samples"}),
    )


def _frozen_surface(job: _Job, data: Any) -> Any:
    """The model (or variant) behind the attack surface its data kind calls for, its weights frozen."""
    from microscope.quantization import load_audited
    from microscope.robustness.surfaces import surface_for

    model = load_audited(job.ref, job.variant, job.cfg.quantize, loading.compute_device(), job.calibration)
    causal = job.arch.is_causal and job.arch.has_unembedding
    try:
        surface = surface_for(model, data.kind, causal)
    except ValueError as exc:
        raise InputError(f"robustness: {exc}") from None
    for p in surface.parameters():
        p.requires_grad_(False)
    return surface


def _autoattacks(
    run: StageRun, job: _Job, surface: Any, x: Any, y: Any, eps: dict[str, float], steps: _Steps
) -> list[dict[str, Any]]:
    """The reference AutoAttack per norm, each result published on its own so a killed run resumes
    from the norms it finished."""
    from microscope.robustness.reference import autoattack

    cfg, rc, store = job.cfg, job.cfg.robustness, job.store
    aa_results = []
    for norm in rc.norms:
        key = f"{run.prefix}/autoattack-{norm}.json"
        if store.exists(key):  # finished before an interruption: not attacked again
            aa_results.append(store.get_json(key))
        else:
            state = store.settings.home_dir / "robustness-state" / run.prefix / f"autoattack-{norm}.json"
            state.parent.mkdir(parents=True, exist_ok=True)
            r = autoattack(
                surface, x, y, norm, eps[norm], rc.version, rc.attacks or None, cfg.seed, rc.batch_size, state
            )
            r["eps_units"] = surface.to_units(eps[norm])
            store.put_json(key, r)
            aa_results.append(r)
        steps.tick()
    return aa_results


def layer_shifts(surface: Any, x: Any, adv: Any, arch: Architecture, cfg: AuditConfig) -> dict[str, float]:
    """At each traced (layer, hook) point: the mean relative change ‖h_adv − h‖ / ‖h‖ of the activation
    between clean and PGD-attacked inputs (largest ε of the sweep): where the attack takes hold."""
    import torch

    from microscope.trace import capture, hook_name, resolve_layers, resolve_points

    points = resolve_points(
        arch.hook_points, resolve_layers(cfg.trace.layers, arch.n_layers), cfg.trace.hooks, arch.family
    )
    acts = []
    for inputs in (x, adv):
        with capture(surface.model, points) as got, torch.no_grad():
            surface(inputs)
        acts.append({lh: got[lh].float() for lh in points})
    out = {}
    for lh in sorted(points):
        a, b = acts[0][lh], acts[1][lh]
        out[hook_name(*lh)] = float(((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)).mean())
    return out


def feature_shifts(
    surface: Any, x: Any, adv: Any, saes: dict[str, StageRecord], store: ArtifactStore, top: int
) -> dict[str, list[dict[str, Any]]]:
    """Per SAE hook: the features with the largest mean |Δ activation| between clean and attacked inputs
    (over samples and positions), with their top contexts from the SAE stage."""
    import pyarrow.parquet as pq
    import torch

    from microscope.sae import io as sae_io
    from microscope.trace import capture

    out: dict[str, list[dict[str, Any]]] = {}
    for hook, rec in saes.items():
        folder = Path(store.local_path(f"{rec.details['prefix']}/sae/cfg.json")).parent
        store.local_path(f"{rec.details['prefix']}/sae/sae_weights.safetensors")  # fetched next to it (S3)
        sae = sae_io.load(folder)
        module = sae.cfg["metadata"]["hook_module"]
        acts = []
        for inputs in (x, adv):
            with capture(surface.model, {(0, hook): module}) as got, torch.no_grad():
                surface(inputs)
            acts.append(sae.encode(got[(0, hook)].float().cpu()))  # the SAE stays on the CPU
        delta = (acts[1] - acts[0]).abs().mean(dim=(0, 1))
        order = torch.argsort(delta, descending=True)[:top].tolist()
        feats = pq.read_table(store.local_path(rec.details["prefix"] + "/features.parquet")).to_pylist()
        out[hook] = [
            {
                "feature": int(i),
                "mean_abs_shift": float(delta[i]),
                "clean_mean": float(acts[0][..., i].mean()),
                "attacked_mean": float(acts[1][..., i].mean()),
                "density": float(feats[i]["density"]) if i < len(feats) else float("nan"),
                "top_contexts": [f"{c['left']}[{c['token']}]{c['right']}" for c in feats[i]["top_contexts"][:3]]
                if i < len(feats)
                else [],
            }
            for i in order
        ]
    return out
