"""How good an SAE is, in the terms researchers use: reconstruction (MSE, FVU), sparsity (L0, dead and
dense latents, density histogram) and downstream effect with the reconstruction spliced into the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from microscope.figures import Figure, Undefined

Encoder = Callable[[torch.Tensor], torch.Tensor]  # raw activations [n, d_in] -> latents [n, d_sae]
Decoder = Callable[[torch.Tensor], torch.Tensor]  # latents -> reconstructions [n, d_in]

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens counts as dense
DENSITY_BINS = np.linspace(-7, 0, 29)  # log10 firing frequency


@torch.no_grad()
def reconstruction(encode: Encoder, decode: Decoder, chunks: Iterable[np.ndarray], d_sae: int) -> dict[str, Any]:
    """MSE (per token, summed over d_in), FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², L0, latent densities."""
    n, sse, l0 = 0, 0.0, 0.0
    s1: np.ndarray | None = None
    s2 = 0.0
    fires = torch.zeros(d_sae, dtype=torch.float64)
    for chunk in chunks:
        x = torch.from_numpy(np.array(chunk, dtype=np.float32))  # a writable copy: Arrow buffers are read-only
        acts = encode(x)
        recon = decode(acts)
        sse += float((recon.double() - x.double()).pow(2).sum())
        l0 += float((acts > 0).sum())
        fires += (acts > 0).sum(0).double()
        xd = x.double().numpy()
        s1 = xd.sum(0) if s1 is None else s1 + xd.sum(0)
        s2 += float((xd**2).sum())
        n += len(x)
    if n == 0:
        raise ValueError("no held-out activations to evaluate on")
    total_var = s2 - float((s1**2).sum()) / n  # Σ‖x − x̄‖²
    density = (fires / n).numpy()
    hist, _ = np.histogram(np.log10(density[density > 0]), bins=DENSITY_BINS)
    return {
        "tokens": n,
        "mse": sse / n,
        "fvu": sse / max(total_var, 1e-300),
        "l0": l0 / n,
        "dead_frac": float((density == 0).mean()),
        "dense_frac": float((density > DENSE_THRESHOLD).mean()),
        "density": density,
        "density_hist": {
            "bins_log10": DENSITY_BINS.tolist(),
            "counts": hist.tolist(),
            "never_fired": int((density == 0).sum()),
        },
    }


@contextmanager
def spliced(model: nn.Module, module_path: str, replace: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, `module_path`'s output is replaced by replace(output)."""
    module = dict(model.named_modules())[module_path]

    def hook(_m: nn.Module, _i: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (replace(out[0]), *out[1:])
        return replace(out)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _reconstruct_fn(reconstruct: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(t: torch.Tensor) -> torch.Tensor:
        shape = t.shape  # [batch, seq, d]
        return reconstruct(t.reshape(-1, shape[-1]).float()).to(t.dtype).reshape(shape)

    return f


GAP_SE = 2.0  # the ablation gap must exceed this many standard errors to be told apart from noise


def ce_recovered(clean: float, spliced: float, zero: float, gap_se: float = 0.0) -> Figure:
    """(zero − spliced) / (zero − clean): the share of the CE that zero-ablating the layer costs which the
    SAE's reconstruction wins back. Undefined when zero-ablation does not raise the CE (the model does not
    use the layer, so there is nothing to recover) or raises it by less than GAP_SE standard errors
    (`gap_se`: s.e. of the per-token gap), where the ratio is a quotient of noise."""
    gap = zero - clean
    if gap <= 0:
        return Undefined(
            f"clean CE {clean:.4g} is not below zero-ablation CE {zero:.4g}: the model does not use this "
            "layer, so recovery is undefined"
        )
    if gap <= max(GAP_SE * gap_se, 1e-12 * max(abs(clean), 1.0)):
        return Undefined(
            f"zero-ablation raises the CE by only {gap:.3g} (± {gap_se:.2g} s.e. over the tokens) above clean "
            f"{clean:.4g}: the denominator is noise, so recovery is undefined"
        )
    return (zero - spliced) / gap


def _token_ce(out: Any, targets: torch.Tensor) -> torch.Tensor:
    """Per-token next-token CE in float64, [n_tokens]: position t predicts token t+1."""
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).double()
    return nn.functional.cross_entropy(logits, targets, reduction="none")


@torch.no_grad()
def downstream(
    model: nn.Module,
    module_path: str,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    ids: np.ndarray,
    batch: int,
    causal: bool,
) -> dict[str, Figure]:
    """Causal LMs: next-token CE clean / spliced / zero-ablated, the fraction of CE recovered (or why it
    is undefined) and KL(clean ‖ spliced). Encoders: cosine of clean and spliced mean-pooled final
    embeddings."""
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    gap_sq = 0.0  # Σ (ce_zero − ce_clean)² per token, for the gap's standard error
    kl_sum, cos_sum, n_tok, n_seq = 0.0, 0.0, 0, 0
    rec = _reconstruct_fn(reconstruct)
    device = next(model.parameters()).device
    for lo in range(0, len(ids), batch):
        x = torch.from_numpy(ids[lo : lo + batch].astype(np.int64)).to(device)
        clean = model(input_ids=x)
        with spliced(model, module_path, rec):
            spl = model(input_ids=x)
        if causal:
            with spliced(model, module_path, torch.zeros_like):
                zero = model(input_ids=x)
            targets = x[:, 1:].reshape(-1)
            per_token = {
                name: _token_ce(out, targets) for name, out in (("clean", clean), ("spliced", spl), ("zero", zero))
            }
            for name, t in per_token.items():
                ce[name] += float(t.sum())
            gap_sq += float((per_token["zero"] - per_token["clean"]).pow(2).sum())
            lp = torch.log_softmax(clean.logits[:, :-1].double(), -1)
            lq = torch.log_softmax(spl.logits[:, :-1].double(), -1)
            kl_sum += float((lp.exp() * (lp - lq)).sum())
            n_tok += targets.numel()
        else:
            a = clean.last_hidden_state.double().mean(1)
            b = spl.last_hidden_state.double().mean(1)
            cos_sum += float(nn.functional.cosine_similarity(a, b, dim=-1).sum())
            n_seq += len(x)
    if causal:
        c = {k: v / n_tok for k, v in ce.items()}
        gap = c["zero"] - c["clean"]
        gap_var = max(gap_sq / n_tok - gap**2, 0.0) / max(n_tok - 1, 1)  # variance of the mean gap
        return {
            "ce_clean": c["clean"],
            "ce_spliced": c["spliced"],
            "ce_zero_ablated": c["zero"],
            "ce_recovered": ce_recovered(c["clean"], c["spliced"], c["zero"], gap_var**0.5),
            "kl_clean_spliced": kl_sum / n_tok,
        }
    return {"embedding_cosine": cos_sum / n_seq}
