"""The landscape stage's computation: a fixed, seeded loss subset per modality and every curvature figure of
`microscope.curvature` over it (top Hessian eigenvalues with their layer composition, 1-D and 2-D
filter-normalised loss slices, ε- and ρ-sharpness, a Lipschitz upper bound, the input–output Jacobian norm).

Every figure is a function of the subset, the seeds and the config, all recorded beside it. They are
diagnostics: compare checkpoints of one run, or a model with its variants, never different models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from schemas.config import LandscapeConfig

DIAGNOSTICS_NOTE = "diagnostics: compare checkpoints of one run or a model with its variants, not across models"
ENCODER_UNDEFINED = (
    "landscape: an encoder without a head has no loss (no labels, no next token), so its loss landscape is undefined"
)
LIPSCHITZ_TEXT = (
    "the layerwise spectral-norm product bounds only a plain chain of Linear/Conv layers; a language model's "
    "attention, residual and normalisation blocks lie outside it"
)
JACOBIAN_TEXT = "the model takes token ids, not float inputs: there is no input-output Jacobian"
JACOBIAN_SAMPLES = 256  # images of the subset the Jacobian norm averages over (each costs `classes` backwards)
SEED_OFFSETS = {"hessian": 0, "d1": 1, "d2": 2, "sharpness": 3}  # seed of each random part = seed + offset


class SubsetLoss:
    """`loss_fn(model) -> scalar`: the mean loss over a fixed subset, the sum of per-batch sums divided by the
    count, so the batch size does not change it (up to float rounding). Images: cross-entropy per image;
    causal LM: next-token cross-entropy per predicted token. Graph-friendly (curvature differentiates it
    twice); `curvature` decides eval mode and no_grad. Tensors move to the model's device once, then stay."""

    def __init__(
        self,
        kind: str,
        inputs: torch.Tensor,
        targets: torch.Tensor | None,
        indices: list[int],
        count: int,
        per_batch: int,
    ) -> None:
        self.kind, self.indices, self.count, self.per_batch = kind, indices, count, per_batch
        self._cpu = (inputs, targets)
        self._placed: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def jacobian_inputs(self) -> torch.Tensor | None:
        """Float inputs for the Jacobian norm (images), None for token ids."""
        return self._cpu[0] if self.kind == "images" else None

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = str(device)
        if key not in self._placed:
            x, y = self._cpu
            self._placed[key] = (x.to(device), None if y is None else y.to(device))
        return self._placed[key]

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        first = next(model.parameters())
        x, y = self._on(first.device)
        total = torch.zeros((), dtype=torch.float64, device=first.device)
        for i in range(0, len(x), self.per_batch):
            xb = x[i : i + self.per_batch]
            if self.kind == "images":
                out = model(xb.to(first.dtype))
                logits = getattr(out, "logits", out)  # [b, classes]
                total = total + F.cross_entropy(logits.float(), y[i : i + self.per_batch], reduction="sum").double()
            else:
                out = model(input_ids=xb, use_cache=False) if hasattr(model, "config") else model(xb)
                logits = getattr(out, "logits", out)  # [b, seq, vocab]; position t predicts token t + 1
                pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
                total = total + F.cross_entropy(pred, xb[:, 1:].reshape(-1), reduction="sum").double()
        return total / self.count


def _pick(n: int, k: int, seed: int) -> np.ndarray:
    """The seeded subset: k of n indices (all when fewer), sorted."""
    return np.sort(np.random.default_rng(seed).permutation(n)[: min(k, n)])


def loss_subset_images(x: np.ndarray, y: np.ndarray, lc: LandscapeConfig, seed: int) -> tuple[list[int], SubsetLoss]:
    """Classifier cross-entropy over `lc.samples` seeded images of x [n, ...] with labels y [n] (all when
    fewer), `lc.batch_size` images per forward pass."""
    import torch

    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"landscape: need images with one label each; got {len(x)} images and {len(y)} labels")
    idx = _pick(len(x), lc.samples, seed)
    inputs = torch.from_numpy(np.ascontiguousarray(x[idx]))
    targets = torch.from_numpy(np.ascontiguousarray(y[idx]).astype(np.int64))
    return idx.tolist(), SubsetLoss("images", inputs, targets, idx.tolist(), len(idx), lc.batch_size)


def loss_subset_text(ids: np.ndarray, lc: LandscapeConfig, seed: int, causal: bool) -> tuple[list[int], SubsetLoss]:
    """Next-token cross-entropy of a causal LM over seeded token windows ids [n_windows, seq_len]: enough
    windows that the predicted tokens (seq_len − 1 per window) reach `lc.samples` (all windows when there
    are fewer). A forward pass takes max(1, batch_size // (seq_len − 1)) windows: `batch_size` counts
    predicted tokens. An encoder (not causal) has no loss here: ValueError."""
    import torch

    if not causal:
        raise ValueError(ENCODER_UNDEFINED)
    if ids.ndim != 2 or len(ids) == 0 or ids.shape[1] < 2:
        raise ValueError(
            f"landscape: need token windows [n_windows >= 1, seq_len >= 2]; got shape {ids.shape} (raise dataset.seq_len)"
        )
    per_window = ids.shape[1] - 1
    idx = _pick(len(ids), math.ceil(lc.samples / per_window), seed)
    inputs = torch.from_numpy(np.ascontiguousarray(ids[idx]).astype(np.int64))
    per_batch = max(1, lc.batch_size // per_window)
    return idx.tolist(), SubsetLoss("text", inputs, None, idx.tolist(), len(idx) * per_window, per_batch)


def loss_for(data: Any, lc: LandscapeConfig, seed: int, causal: bool) -> tuple[list[int], SubsetLoss]:
    """The subset loss of an audit's data (`microscope.modality`): ImageData (`x`, `y`) or TextData (`ids`)."""
    if data.kind == "images":
        return loss_subset_images(data.x, data.y, lc, seed)
    return loss_subset_text(data.ids, lc, seed, causal)


def block_of(name: str) -> str:
    """A parameter's block: its module path up to the first numbered child (`transformer.h.3.attn.c_attn.weight`
    → `transformer.h.3`), else its module (`transformer.wte.weight` → `transformer.wte`), else itself."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


def by_block(composition: dict[str, float]) -> dict[str, float]:
    """Shares per parameter summed per block, largest first."""
    out: dict[str, float] = {}
    for name, share in composition.items():
        out[block_of(name)] = out.get(block_of(name), 0.0) + float(share)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def second_derivative(alphas: list[float], losses: list[float]) -> float:
    """d²L/dα² at 0 from the parabola through the three grid points nearest 0 (the central difference
    (L₊ − 2L₀ + L₋)/h² on an odd, even-spaced grid)."""
    (x0, f0), (x1, f1), (x2, f2) = sorted(sorted(zip(alphas, losses, strict=True), key=lambda p: abs(p[0]))[:3])
    return 2.0 * (f0 / ((x0 - x1) * (x0 - x2)) + f1 / ((x1 - x0) * (x1 - x2)) + f2 / ((x2 - x0) * (x2 - x1)))


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _loss_at_theta(model: torch.nn.Module, loss_fn: Callable) -> float:
    """The loss in eval mode without gradients, the modules' modes restored."""
    import torch

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return float(loss_fn(model))
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """HF attention switched to eager (double backward through fused attention is not implemented), and back
    afterwards: the slices' many forward passes run faster fused."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not hasattr(model, "set_attn_implementation") or before in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def evaluate(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor],
    lc: LandscapeConfig,
    seed: int,
    jacobian_inputs: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Every landscape figure of `model` over `loss_fn`'s subset; a JSON-serialisable dict that, with the
    stage's `prefix` and `variant`, validates as `schemas.details.landscape.LandscapeDetails`. `figures`
    holds the finite numbers (`loss`, `lambda_max`, `lambda_2`…, `eps_sharpness`, `rho_sharpness`,
    `lipschitz_upper`, `jacobian_norm`, `slice_1d_curvature`), `undefined` the rest with the reason.
    Jacobian inputs: `jacobian_inputs`, else the images of a `SubsetLoss` (its first JACOBIAN_SAMPLES).
    HF attention runs eager for the Hessian (double backward through fused attention is not implemented), then
    as before. A causal LM's figures are per predicted token; `loss_fn` may be any `curvature.LossFn`.
    Indices of the subset are not in the dict: `loss_subset_*` returns them and the stage records them."""
    from microscope import curvature as cv

    kind = getattr(loss_fn, "kind", None)
    figures: dict[str, float] = {}
    undefined: dict[str, str] = {}
    seconds: dict[str, float] = {}
    seeds = {part: seed + off for part, off in SEED_OFFSETS.items()}

    def timed(part: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            seconds[part] = time.perf_counter() - t0

    def put(name: str, value: float | None, why: str = "not finite (the loss overflowed or diverged)") -> None:
        if value is not None and math.isfinite(value):
            figures[name] = float(value)
        else:
            undefined[name] = why

    put("loss", timed("loss", lambda: _loss_at_theta(model, loss_fn)))

    eigen: list[dict[str, Any]] = []
    if lc.eigenvalues > 0:
        with _eager_attention(model):
            res = timed("hessian", lambda: cv.hessian_top_eigen(
                model, loss_fn, k=lc.eigenvalues, iters=lc.power_iters, tol=lc.power_tol, seed=seeds["hessian"]
            ))  # fmt: skip
        # curvature returns the top eigenvector's composition; `compositions` (one per eigenvalue) when it has them
        comps = res.get("compositions") or [res["composition"]] + [None] * (len(res["eigenvalues"]) - 1)
        for i, (lam, its, ok, comp) in enumerate(
            zip(res["eigenvalues"], res["iterations"], res["converged"], comps, strict=True)
        ):
            eigen.append({"eigenvalue": _finite(float(lam)), "iterations": int(its), "converged": bool(ok),
                          "composition": by_block(comp) if comp is not None else None})  # fmt: skip
            put("lambda_max" if i == 0 else f"lambda_{i + 1}", float(lam))
    else:
        undefined["lambda_max"] = "landscape.eigenvalues is 0: no Hessian eigenvalues were asked for"

    alphas = [float(a) for a in np.linspace(-lc.span, lc.span, lc.grid)]
    d1 = cv.random_direction(model, seeds["d1"])
    line = timed("slice_1d", lambda: cv.loss_slice_1d(model, loss_fn, d1, alphas))
    put("slice_1d_curvature", second_derivative(alphas, line))
    slice_1d = {"alphas": alphas, "loss": [_finite(v) for v in line], "direction_seed": seeds["d1"]}
    slice_2d = None
    if lc.slice_2d:
        d2 = cv.random_direction(model, seeds["d2"])
        grid = timed("slice_2d", lambda: cv.loss_slice_2d(model, loss_fn, d1, d2, alphas, alphas))
        slice_2d = {"alphas": alphas, "betas": alphas, "loss": [[_finite(v) for v in row] for row in grid],
                    "direction_seeds": [seeds["d1"], seeds["d2"]]}  # fmt: skip

    sharp = timed("sharpness", lambda: cv.sharpness(
        model, loss_fn, eps=lc.sharpness_eps, rho=lc.sharpness_rho, adaptive=lc.adaptive, seed=seeds["sharpness"]
    ))  # fmt: skip
    put("eps_sharpness", sharp["eps_sharpness"])
    put("rho_sharpness", sharp["rho_sharpness"])
    sharpness = {k: sharp[k] for k in ("eps", "rho", "adaptive", "steps", "label")} | {"seed": seeds["sharpness"]}

    if kind == "text":
        undefined["lipschitz_upper"] = LIPSCHITZ_TEXT
    else:
        try:
            put("lipschitz_upper", timed("lipschitz", lambda: cv.lipschitz_upper_bound(model)), "overflowed")
        except ValueError as e:
            undefined["lipschitz_upper"] = str(e)

    x = jacobian_inputs if jacobian_inputs is not None else getattr(loss_fn, "jacobian_inputs", None)
    jac_n = None
    if x is None:
        undefined["jacobian_norm"] = JACOBIAN_TEXT if kind == "text" else "no float inputs were given"
    else:
        first = next(model.parameters())
        x = x[:JACOBIAN_SAMPLES].to(first.device, first.dtype)
        jac_n = len(x)
        put("jacobian_norm", timed("jacobian", lambda: cv.jacobian_norm(model, x)))

    return {
        "seed": seed,
        "seeds": seeds,
        "kind": kind,
        "samples": getattr(loss_fn, "count", None),
        "per_batch": getattr(loss_fn, "per_batch", None),
        "config": lc.model_dump(mode="json"),
        "figures": figures,
        "undefined": undefined,
        "eigen": eigen,
        "slice_1d": slice_1d,
        "slice_2d": slice_2d,
        "sharpness": sharpness,
        "jacobian_samples": jac_n,
        "seconds": seconds,
        "diagnostics_note": DIAGNOSTICS_NOTE,
    }


def small(results: dict[str, Any]) -> dict[str, Any]:
    """`evaluate`'s results (plus the stage's `variant`) as LandscapeDetails' fields: all but `subset`, the
    indices the stage keeps in results.json."""
    return {k: v for k, v in results.items() if k != "subset"}
