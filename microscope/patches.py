"""Weight patches: a set of SAE steering edits turned into a change of one projection's weights, so the
edited behaviour runs without the SAE in the loop (and ships as a PEFT LoRA adapter).

The patched projection is the last writer into the residual inside the hooked block (GPT-2 `h.L.mlp.c_proj`):
its output is added to the block's output unchanged, so a change of its output is a change of the hook's
output, token by token.

- Add edits only: the SAE edit is a constant δ = Σ α_i·max_act_i·W_dec[i] on every token, and δ added to the
  projection's bias reproduces it exactly (up to float rounding). Kind "bias".
- Clamps (ablations) depend on the token: Δh = Σ (new_i − f_i(h))·W_dec[i]. A rank-r update ΔW = B·A (r = the
  clamped features) plus a bias (the add edits and the mean shift) is fitted by least squares on calibration
  windows, from the projection's inputs to Δh. Kind "lora"; approximate, and its fidelity is measured.

Blocks that normalise after their last projection (BERT's `output.LayerNorm`) are refused: a change before the
norm is not a change of the block's output. Only positions="all" can be patched: weights see no positions.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microscope.errors import InputError
from microscope.steering import Edit, Positions

if TYPE_CHECKING:
    import torch
    from torch import nn

    from microscope.steering import Steerer

MAX_RANK = 16
HELD_OUT = 0.25  # the share of calibration windows kept out of the fit, for the fidelity figures
MANIFEST = "microscope_patch.json"
RIDGE = 1e-9  # × the mean input variance: keeps the normal equations solvable when the inputs are degenerate


@dataclass
class Patch:
    module: str  # path of the patched projection, e.g. transformer.h.1.mlp.c_proj
    kind: str  # "bias" | "lora"
    tensors: dict[str, torch.Tensor]  # bias: delta_bias [out]; lora: lora_A [r, in], lora_B [out, r], delta_bias
    rank: int  # 0 for a bias patch
    edits: list[Edit]
    positions: Positions = "all"
    fidelity: dict[str, float] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-able values."""
        edits = [{"feature": e.feature, "mode": e.mode, "alpha": e.alpha} for e in self.edits]
        positions = self.positions if isinstance(self.positions, str) else list(self.positions)
        return {"module": self.module, "kind": self.kind, "rank": self.rank, "edits": edits, "positions": positions}


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"  # transformers' GPT-2 projection: y = x @ W + b, W [in, out]


def _out_in(m: nn.Module) -> tuple[int, int] | None:
    """(out, in) features of a Linear or Conv1D, None for any other module."""
    from torch import nn

    if _is_conv1d(m):
        return int(m.weight.shape[1]), int(m.weight.shape[0])
    if type(m) is nn.Linear:  # not subclasses: quantized linears keep their weights elsewhere
        return m.out_features, m.in_features
    return None


def find_writer(model: nn.Module, module_path: str, d_model: int) -> str:
    """The last Linear/Conv1D inside `module_path` (itself included) whose output is d_model wide: the last
    writer into the residual there. Refused where a norm follows it inside the block."""
    block = dict(model.named_modules())[module_path]
    subs = list(block.named_modules())  # registration order, which for HF blocks is the order of use
    writer = None
    for i, (_name, m) in enumerate(subs):
        shape = _out_in(m)
        if shape is not None and shape[0] == d_model:
            writer = i
    if writer is None:
        raise InputError(f"{module_path} has no Linear/Conv1D writing {d_model} features: nothing to patch")
    norms = [n for n, m in subs[writer + 1 :] if "norm" in type(m).__name__.lower()]
    name = subs[writer][0]
    if norms:
        raise InputError(
            f"{module_path} normalises ({norms[0]}) after its last projection {name}: a weight patch there "
            "does not reproduce the edit; patch a hook on a pre-norm (GPT-style) block instead"
        )
    return f"{module_path}.{name}" if name else module_path


def _capture(module: nn.Module, what: str) -> tuple[list[torch.Tensor], Any]:
    """A forward hook collecting the module's input ('in') or output ('out', hidden state first)."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: Any, out: Any) -> None:
        x = inputs[0] if what == "in" else (out[0] if isinstance(out, tuple) else out)
        got.append(x.detach())

    return got, module.register_forward_hook(hook)


def make_patch(
    steerer: Steerer, edits: Sequence[Edit], calibration: torch.Tensor, positions: Positions = "all"
) -> Patch:
    """Fit a weight patch reproducing `edits` on windows [N, T]; the last quarter of them (at least one) is
    held out for the fidelity figures. A bias patch is exact; a LoRA patch is a least-squares fit."""
    if positions != "all":
        raise InputError(f"positions {positions!r}: a weight patch acts on every token, so only 'all' can be patched")
    plan = steerer._plan(edits)
    if plan is None:
        raise InputError("the edits change nothing (no edits, or only +0 adds): there is no patch to make")
    ids = steerer._ids(calibration)
    n = ids.shape[0]
    if n < 2:
        raise InputError(f"{n} calibration window: need at least 2 (one to fit, one held out)")
    n_held = max(1, int(round(n * HELD_OUT)))
    fit_ids, held_ids = ids[: n - n_held], ids[n - n_held :]
    d = steerer.sae.W_dec.shape[1]
    module = find_writer(steerer.model, steerer.module_path, d)
    proj = dict(steerer.model.named_modules())[module]
    n_clamp = 0 if plan.clamp_idx is None else len(plan.clamp_idx)
    if n_clamp == 0:  # a constant shift on every token: the bias is the exact place for it
        delta = plan.add.detach().float().cpu()  # [d]
        patch = Patch(module, "bias", {"delta_bias": delta}, 0, list(edits), positions)
    else:
        if n_clamp > MAX_RANK:
            raise InputError(f"{n_clamp} clamped features: a patch takes at most {MAX_RANK}")
        with steerer._session():
            a, b, bias, resid = _fit_lora(steerer, plan, proj, fit_ids, n_clamp)
        tensors = {"lora_A": a, "lora_B": b, "delta_bias": bias}
        patch = Patch(module, "lora", tensors, n_clamp, list(edits), positions, {"fit_rel_residual": resid})
    patch.fidelity |= fidelity(steerer, patch, held_ids)
    patch.fidelity |= {"calibration_windows": float(n - n_held), "heldout_windows": float(n_held)}
    return patch


def _fit_lora(
    steerer: Steerer, plan: Any, proj: nn.Module, ids: torch.Tensor, rank: int, batch: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Least squares from the projection's inputs x [n, in] to the edit's Δh [n, d] at the hook, with a bias:
    normal equations in float64 accumulated over batches (memory in², not tokens × in), the full-rank ΔW*
    truncated by SVD to `rank`, then the bias refitted for the truncated ΔW. Returns A [r, in], B [d, r],
    bias [d] (float32, CPU) and ‖fit − Δh‖/‖Δh‖ on the fitting tokens."""
    import torch

    hook_mod = steerer.module
    gram = cross = None
    count, y_sq = 0, 0.0
    xs_ys: list[tuple[torch.Tensor, torch.Tensor]] = []
    for lo in range(0, ids.shape[0], batch):
        xin, h_in = _capture(proj, "in")
        hout, h_out = _capture(hook_mod, "out")
        try:
            steerer.model(input_ids=ids[lo : lo + batch])
        finally:
            h_in.remove()
            h_out.remove()
        x = xin[0].reshape(-1, xin[0].shape[-1]).double().cpu()  # [n, in]
        h = hout[0].reshape(-1, hout[0].shape[-1]).float()  # [n, d]
        y = (steerer._apply(h, plan) - h).double().cpu()  # [n, d] the SAE edit, the target
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # [n, in + 1]: the last column fits a bias
        gram = x1.T @ x1 if gram is None else gram + x1.T @ x1
        cross = x1.T @ y if cross is None else cross + x1.T @ y
        count, y_sq = count + len(x), y_sq + float((y**2).sum())
        xs_ys.append((x, y))
    k = gram.shape[0] - 1
    ridge = RIDGE * float(gram.diagonal()[:k].mean()) + 1e-30
    gram.diagonal()[:k] += ridge * count  # a view: adds in place
    sol = torch.linalg.lstsq(gram, cross).solution  # [in + 1, d]
    w_full = sol[:k].T  # [d, in] ΔW* (Linear orientation: Δy = x @ ΔW*ᵀ)
    u, s, vh = torch.linalg.svd(w_full, full_matrices=False)
    b_fac = u[:, :rank] * s[:rank]  # [d, r]
    a_fac = vh[:rank]  # [r, in]
    mean_x = gram[k, :k] / count  # the ones column's cross terms are the input sums
    mean_y = cross[k] / count
    bias = mean_y - (a_fac @ mean_x) @ b_fac.T  # [d] the best bias once ΔW is truncated
    err = sum(float(((x @ a_fac.T @ b_fac.T + bias - y) ** 2).sum()) for x, y in xs_ys)
    resid = (err / y_sq) ** 0.5 if y_sq > 0 else 0.0
    return a_fac.float(), b_fac.float(), bias.float(), resid


def _delta_weight(patch: Patch) -> torch.Tensor | None:
    """ΔW [out, in] (Linear orientation), None for a bias patch."""
    return patch.tensors["lora_B"] @ patch.tensors["lora_A"] if patch.kind == "lora" else None


@dataclass
class PatchHandle:
    """Undoes `apply_patch`: the original parameters, copied back bit for bit."""

    originals: list[tuple[torch.nn.Parameter, torch.Tensor]]
    removed: bool = False

    def remove(self) -> None:
        import torch

        if self.removed:
            return
        with torch.no_grad():
            for param, orig in self.originals:
                param.copy_(orig)
        self.removed = True


def apply_patch(model: nn.Module, patch: Patch) -> PatchHandle:
    """Write the patch into the model's weights in place; `remove_patch(handle)` restores them exactly."""
    import torch

    modules = dict(model.named_modules())
    if patch.module not in modules:
        raise InputError(f"the model has no module {patch.module!r}: the patch was made for another architecture")
    proj = modules[patch.module]
    shape = _out_in(proj)
    if shape is None:
        raise InputError(f"{patch.module} is a {type(proj).__name__}, not a Linear/Conv1D: cannot patch it")
    out_f, in_f = shape
    bias = patch.tensors.get("delta_bias")
    dw = _delta_weight(patch)
    if bias is not None and bias.shape != (out_f,):
        raise InputError(f"the patch's bias has shape {tuple(bias.shape)}; {patch.module} writes {out_f} features")
    if dw is not None and dw.shape != (out_f, in_f):
        raise InputError(f"the patch's ΔW has shape {tuple(dw.shape)}; {patch.module} is {out_f}×{in_f}")
    if bias is not None and proj.bias is None:
        raise InputError(f"{patch.module} has no bias to shift; this patch needs one")
    originals = []
    with torch.no_grad():
        if bias is not None:
            originals.append((proj.bias, proj.bias.detach().clone()))
            proj.bias.add_(bias.to(proj.bias))
        if dw is not None:
            originals.append((proj.weight, proj.weight.detach().clone()))
            proj.weight.add_((dw.T if _is_conv1d(proj) else dw).to(proj.weight))  # Conv1D keeps W as [in, out]
    return PatchHandle(originals)


def remove_patch(handle: PatchHandle | None) -> None:
    if handle is not None:
        handle.remove()


def _kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position from log-probabilities [..., V] (float64)."""
    return (lp.exp() * (lp - lq)).sum(-1)


def fidelity(steerer: Steerer, patch: Patch, windows: torch.Tensor, batch: int = 8) -> dict[str, float]:
    """On windows [N, T]: mean KL(steered ‖ patched) and KL(steered ‖ clean) of the next-token distributions
    over every position, and ‖h_patched − h_steered‖ / ‖h_steered − h_clean‖ at the hook."""
    import torch

    ids = steerer._ids(windows)
    kl_patch = kl_clean = err = ref = 0.0
    count = 0
    with steerer._session():
        for lo in range(0, ids.shape[0], batch):
            x = ids[lo : lo + batch]
            runs = {}
            for name in ("clean", "steered", "patched"):
                patch_handle = apply_patch(steerer.model, patch) if name == "patched" else None
                try:
                    with steerer.edited(patch.edits if name == "steered" else (), patch.positions):
                        got, handle = _capture(steerer.module, "out")  # after the edit hook: sees its output
                        try:
                            logits = steerer.model(input_ids=x).logits
                        finally:
                            handle.remove()
                finally:
                    remove_patch(patch_handle)
                runs[name] = (torch.log_softmax(logits.double(), -1), got[0].double())
            (lc, hc), (ls, hs), (lp, hp) = runs["clean"], runs["steered"], runs["patched"]
            kl_patch += float(_kl_rows(ls, lp).sum())
            kl_clean += float(_kl_rows(ls, lc).sum())
            err += float(((hp - hs) ** 2).sum())
            ref += float(((hs - hc) ** 2).sum())
            count += x.shape[0] * x.shape[1]
    return {
        "kl_patched": kl_patch / count,  # KL(steered ‖ patched), mean over positions
        "kl_unpatched": kl_clean / count,  # KL(steered ‖ clean): what no patch at all scores
        "rel_residual": (err / ref) ** 0.5 if ref > 0 else 0.0,
        "heldout_tokens": float(count),
    }


def _stub(model: nn.Module, module: str) -> nn.Module:
    """A module tree holding only a copy of the projection at its path, so that peft can wrap it and name
    the adapter's keys as for the whole model, without touching the model itself."""
    import copy

    from torch import nn

    proj = copy.deepcopy(dict(model.named_modules())[module]).cpu().float()
    root: nn.Module = nn.Module()
    node = root
    parts = module.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(parts[-1], proj)
    return root


def save_adapter(patch: Patch, model: nn.Module, folder: Path | str, manifest: dict[str, Any]) -> list[Path]:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, loadable with
    `PeftModel.from_pretrained(base, folder)`) and microscope_patch.json. A bias lives on lora_B's bias
    (`lora_bias=True`); a bias patch is a rank-1 LoRA with zero factors and that bias."""
    import torch
    from peft import LoraConfig, get_peft_model

    folder = Path(folder)
    proj = dict(model.named_modules())[patch.module]
    out_f, in_f = _out_in(proj) or (0, 0)
    bias = patch.tensors.get("delta_bias")
    if patch.kind == "lora":
        a, b, rank = patch.tensors["lora_A"], patch.tensors["lora_B"], patch.rank
    else:
        a, b, rank = torch.zeros(1, in_f), torch.zeros(out_f, 1), 1  # exact: zero factors, the bias does it all
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling = lora_alpha / r = 1, so the factors apply as they are
        target_modules=[patch.module],
        lora_dropout=0.0,
        init_lora_weights=False,
        fan_in_fan_out=_is_conv1d(proj),  # Conv1D stores W as [in, out]; lora_A/B keep Linear's orientation
        lora_bias=bias is not None,
    )
    peft_model = get_peft_model(_stub(model, patch.module), config)
    layer = dict(peft_model.named_modules())[f"base_model.model.{patch.module}"]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)  # [r, in]
        layer.lora_B["default"].weight.copy_(b)  # [out, r]
        if bias is not None:
            layer.lora_B["default"].bias.copy_(bias)
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # peft takes the 1-D lora_B.bias for an unsharded ZeRO-3 tensor
        warnings.filterwarnings("ignore", message=".*invalid shape.*")
        peft_model.save_pretrained(str(folder))
    meta = manifest | patch.describe() | {"fidelity": patch.fidelity, "peft_rank": rank}
    (folder / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return [folder / "adapter_config.json", folder / "adapter_model.safetensors", folder / MANIFEST]


def load_adapter(folder: Path | str) -> tuple[dict[str, Any], Patch]:
    """The manifest and the Patch saved by `save_adapter`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    paths = [folder / MANIFEST, folder / "adapter_model.safetensors"]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{folder} is not a microscope patch: {', '.join(missing)} missing")
    try:
        meta = json.loads(paths[0].read_text())
        module, kind = meta["module"], meta["kind"]
        edits = [Edit(int(e["feature"]), e["mode"], float(e["alpha"])) for e in meta["edits"]]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{paths[0]} is not a valid patch manifest ({type(e).__name__}: {e})") from None
    weights = load_file(str(paths[1]))
    prefix = f"base_model.model.{module}."
    tensors = {}
    if f"{prefix}lora_B.bias" in weights:
        tensors["delta_bias"] = weights[f"{prefix}lora_B.bias"]
    if kind == "lora":
        tensors["lora_A"] = weights[f"{prefix}lora_A.weight"]
        tensors["lora_B"] = weights[f"{prefix}lora_B.weight"]
    positions = meta.get("positions", "all")
    positions = positions if isinstance(positions, str) else tuple(positions)
    fid = {k: float(v) for k, v in (meta.get("fidelity") or {}).items()}
    return meta, Patch(module, kind, tensors, int(meta.get("rank", 0)), edits, positions, fid)


def check_digest(meta: dict[str, Any], digest: str | None) -> None:
    """One-line refusal where the patch was made for other weights."""
    want = meta.get("model_digest")
    if want is None or digest is None or want != digest:
        raise InputError(
            f"the patch was made for model {str(want)[:16]}…, this audit's model is {str(digest)[:16]}…: "
            "export the patch from an audit of these weights"
        )
