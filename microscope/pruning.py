"""Unstructured weight pruning: global or per-layer magnitude, SNIP (Lee et al. 2019) and Wanda
(Sun et al. 2023), applied as plain zeroed weights (no fine-tuning after pruning).

Which matrices are pruned: the floating-point `weight` (2-D or more) of every `nn.Linear`, `nn.Conv2d`
and HF `Conv1D` (GPT-2 style, stored [in, out]), matched by isinstance or by class name. Never
pruned: embeddings (nor a module whose weight is tied to one) and the modules named in `exclude`,
which defaults to the model's output head (`get_output_embeddings()`). Prune before quantizing:
quantized layers (int8/4-bit storage) are not floating point and are skipped.

Masks are boolean tensors shaped like each weight, keyed by module name; True keeps the weight.
Ties in a score are broken by index (stable sort), so the number pruned is always exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from schemas.config import PRUNE_FORMAT, PRUNE_FORMS, unknown_format

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

METHODS = ("magnitude", "snip", "wanda")
_PRUNED_CLASSES = {"Linear", "Conv1D", "Conv2d"}
NOTE = "no fine-tuning after pruning"


@dataclass(frozen=True)
class PruneSpec:
    method: str  # magnitude | snip | wanda
    scope: Literal["global", "layer"]  # snip ranks globally; wanda per output row, i.e. within a layer
    sparsity: float  # fraction pruned, in (0, 1)
    then: str | None  # quantization format applied after pruning
    name: str


def is_pruning(name: str) -> bool:
    return PRUNE_FORMAT.fullmatch(name) is not None


def parse_format(name: str) -> PruneSpec:
    """`magnitude-50` -> PruneSpec; a one-line ValueError naming the forms for anything else."""
    m = PRUNE_FORMAT.fullmatch(name)
    if m is None or (why := unknown_format(name)):
        raise ValueError(why if m is not None else f"unknown pruning format {name!r}: use {PRUNE_FORMS}")
    method = m.group(1)
    scope: Literal["global", "layer"] = "layer" if m.group(2) or method == "wanda" else "global"
    return PruneSpec(method, scope, int(m.group(3)) / 100, m.group(4), name)


def _check_sparsity(sparsity: float) -> None:
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")


def default_exclude(model: nn.Module) -> set[str]:
    """The output head's module name, where the model has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, mod in model.named_modules() if head is not None and mod is head}


def prunable(model: nn.Module, exclude: set[str] | None = None) -> dict[str, nn.Module]:
    """The modules whose weights are pruned, by name (see the module docstring)."""
    import torch
    import torch.nn as nn

    exclude = default_exclude(model) if exclude is None else exclude
    # A head tied to the input embedding shares its tensor: pruning it would prune the embedding.
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        kind = isinstance(mod, nn.Linear | nn.Conv2d) or type(mod).__name__ in _PRUNED_CLASSES
        if not kind or name in exclude or not isinstance(w, torch.Tensor) or id(w) in embedded:
            continue
        if w.dim() >= 2 and w.is_floating_point():
            out[name] = mod
    return out


def _keep_all_but_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask over a 1-D score vector: the k lowest (ties: lowest index first) are False."""
    import torch

    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    # Selection, not a sort (O(n)): everything below the k-th smallest score, then the lowest-index ties
    # at it until exactly k; the same set a stable sort's first k would give.
    threshold = torch.kthvalue(scores, k).values
    below = scores < threshold
    keep[below] = False
    ties = torch.nonzero(scores == threshold).flatten()[: k - int(below.sum())]
    keep[ties] = False
    return keep


def _global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    import torch

    _check_sparsity(sparsity)
    flat = torch.cat([s.detach().flatten().float().cpu() for s in scores.values()])
    keep = _keep_all_but_lowest(flat, int(sparsity * flat.numel()))
    sizes = [s.numel() for s in scores.values()]
    parts = torch.split(keep, sizes)
    return {n: p.view(s.shape).to(s.device) for (n, s), p in zip(scores.items(), parts, strict=True)}


def magnitude_masks(
    model: nn.Module, sparsity: float, scope: str = "global", exclude: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """Prune the ⌊sparsity·N⌋ smallest |w| over all selected weights (global) or ⌊sparsity·n_i⌋ per matrix."""
    scores = {n: m.weight.detach().abs() for n, m in prunable(model, exclude).items()}
    if scope == "global":
        return _global_masks(scores, sparsity)
    if scope != "layer":
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return {n: next(iter(_global_masks({n: s}, sparsity).values())) for n, s in scores.items()}


def snip_scores(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], exclude: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """|∂L/∂m| at m = 1 for W ⊙ m, i.e. |g ⊙ w|, from one call of `loss_fn(model)` (one minibatch)."""
    import torch

    mods = prunable(model, exclude)
    weights = [m.weight for m in mods.values()]
    frozen = [w for w in weights if not w.requires_grad]
    for w in frozen:  # gradients are needed even for frozen weights; restored below
        w.requires_grad_(True)
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(model), weights, allow_unused=True)
    finally:
        for w in frozen:
            w.requires_grad_(False)
    return {
        n: (w.detach() * (torch.zeros_like(w) if g is None else g)).abs()
        for n, w, g in zip(mods, weights, grads, strict=True)
    }


def snip_masks(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    sparsity: float,
    exclude: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """SNIP: prune the globally smallest |g ⊙ w|. `loss_fn(model)` returns the loss on one minibatch."""
    return _global_masks(snip_scores(model, loss_fn, exclude), sparsity)


def _as_out_in(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor viewed as [out, in]: Conv1D stores [in, out]; Conv2d flattens (in, kh, kw)."""
    return t.t() if type(mod).__name__ == "Conv1D" else t.reshape(t.shape[0], -1)


def _from_out_in(mod: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return t.t() if type(mod).__name__ == "Conv1D" else t.reshape(mod.weight.shape)


def wanda_scores(
    model: nn.Module, input_norms: Mapping[str, torch.Tensor], exclude: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """|W_ij|·‖X_j‖₂, shaped like each weight; ‖X_j‖ is over all tokens (Conv2d: patch positions)."""
    out = {}
    for n, mod in prunable(model, exclude).items():
        if n not in input_norms:
            raise ValueError(f"wanda: no input norms for {n!r}; collect them with input_norms_from_activations")
        w = _as_out_in(mod, mod.weight.detach())
        norms = input_norms[n].to(w.device, w.dtype).reshape(1, -1)
        out[n] = _from_out_in(mod, w.abs() * norms)
    return out


def wanda_masks(
    model: nn.Module, input_norms: Mapping[str, torch.Tensor], sparsity: float, exclude: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """Wanda: within each output row, prune the ⌊sparsity·in⌋ smallest |W_ij|·‖X_j‖ (ties: lowest j)."""
    import torch

    _check_sparsity(sparsity)
    mods = prunable(model, exclude)
    masks = {}
    for n, s in wanda_scores(model, input_norms, exclude).items():
        rows = _as_out_in(mods[n], s)
        k = int(sparsity * rows.shape[1])
        keep = torch.ones_like(rows, dtype=torch.bool)
        keep.scatter_(1, torch.sort(rows, dim=1, stable=True).indices[:, :k], False)
        masks[n] = _from_out_in(mods[n], keep)
    return masks


def _features(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as [tokens, in features], in the weight's `in` order."""
    import torch.nn.functional as F

    if getattr(mod, "kernel_size", None) is None:  # Linear, Conv1D
        return x.reshape(-1, x.shape[-1])
    if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        raise ValueError("wanda: Conv2d with groups, non-zero padding mode or string padding is not supported")
    cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # [B, in·kh·kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_norms_from_activations(
    model: nn.Module, batches: Iterable[Any], exclude: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over every token of every batch, per selected module (forward pre-hooks, eval mode).

    A batch is called as model(**b) if a mapping, model(*b) if a tuple or list, else model(b)."""
    import torch

    mods = prunable(model, exclude)
    sq: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(mod: nn.Module, args: tuple[Any, ...]) -> None:
            f = _features(mod, args[0].detach()).double()  # float64: sums over many tokens
            sq[name] = sq.get(name, 0) + f.pow(2).sum(0)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    was_training = model.training
    model.eval()  # dropout would make the norms random
    try:
        with torch.no_grad():
            for b in batches:
                _ = model(**b) if isinstance(b, Mapping) else model(*b) if isinstance(b, tuple | list) else model(b)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    # Conv2d: one norm per (in channel, kh, kw), flattened in the weight's order.
    return {n: v.sqrt().float() for n, v in sq.items()}


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, float | str]:
    """Zero the masked weights in place, folded (no weight_orig/weight_mask left, state_dict keys and order
    unchanged). Returns each pruned matrix's exact sparsity, `overall` over them, and `note`."""
    from torch.nn.utils import prune as torch_prune

    out: dict[str, float | str] = {}
    zeros = total = 0
    for name, mask in masks.items():
        mod = model.get_submodule(name)
        order = list(mod._parameters)
        torch_prune.custom_from_mask(mod, "weight", mask.to(mod.weight.device))
        torch_prune.remove(mod, "weight")
        mod._parameters = {k: mod._parameters[k] for k in order}  # remove() re-adds weight last
        z = int((mod.weight == 0).sum())
        out[name] = z / mod.weight.numel()
        zeros, total = zeros + z, total + mod.weight.numel()
    out["overall"] = zeros / total if total else 0.0
    out["note"] = NOTE
    return out


def prune(
    model: nn.Module,
    spec: PruneSpec,
    loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
    input_norms: Mapping[str, torch.Tensor] | None = None,
    exclude: set[str] | None = None,
) -> dict[str, float | str]:
    """Prune `model` in place per `spec`; snip needs `loss_fn`, wanda `input_norms`."""
    if spec.method == "magnitude":
        masks = magnitude_masks(model, spec.sparsity, spec.scope, exclude)
    elif spec.method == "snip":
        if loss_fn is None:
            raise ValueError(f"{spec.name}: snip needs loss_fn (the loss on one minibatch)")
        masks = snip_masks(model, loss_fn, spec.sparsity, exclude)
    elif spec.method == "wanda":
        if input_norms is None:
            raise ValueError(f"{spec.name}: wanda needs input_norms (see input_norms_from_activations)")
        masks = wanda_masks(model, input_norms, spec.sparsity, exclude)
    else:
        raise ValueError(f"unknown pruning method {spec.method!r}: use one of {', '.join(METHODS)}")
    return apply_masks(model, masks)


@dataclass(frozen=True)
class Calibration:
    """The audit's data as pruning needs it: SNIP's loss on one minibatch, Wanda's activation batches."""

    loss_fn: Callable[[nn.Module], torch.Tensor] | None  # None: the model has no loss (`why_no_loss`)
    batches: list[Any]
    why_no_loss: str = ""
    description: str = ""  # which samples, for the record


def prune_with(model: nn.Module, spec: PruneSpec, calibration: Calibration | None) -> dict[str, float | str]:
    """`prune` with the inputs taken from the audit's data; a one-line ValueError where they cannot be."""
    if spec.method != "magnitude" and calibration is None:
        raise ValueError(f"{spec.name}: {spec.method} needs the audit's data (a calibration minibatch)")
    if spec.method == "snip" and calibration is not None and calibration.loss_fn is None:
        raise ValueError(f"{spec.name}: SNIP needs a loss and {calibration.why_no_loss}; use magnitude or wanda")
    norms = None
    if spec.method == "wanda" and calibration is not None:
        norms = input_norms_from_activations(model, calibration.batches)
    return prune(model, spec, calibration.loss_fn if calibration else None, norms)
