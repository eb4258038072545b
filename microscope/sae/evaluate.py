"""How good an SAE is, in the terms researchers use: reconstruction (MSE, FVU), sparsity (L0, dead and
dense latents, density histogram) and downstream effect with the reconstruction spliced into the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

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
        x = torch.from_numpy(np.ascontiguousarray(chunk)).float()
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


@torch.no_grad()
def downstream(
    model: nn.Module,
    module_path: str,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    ids: np.ndarray,
    batch: int,
    causal: bool,
) -> dict[str, float]:
    """Causal LMs: next-token CE clean / spliced / zero-ablated, the fraction of CE recovered and
    KL(clean ‖ spliced). Encoders: cosine of clean and spliced mean-pooled final embeddings."""
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    kl_sum, cos_sum, n_tok, n_seq = 0.0, 0.0, 0, 0
    rec = _reconstruct_fn(reconstruct)
    for lo in range(0, len(ids), batch):
        x = torch.from_numpy(ids[lo : lo + batch].astype(np.int64))
        clean = model(input_ids=x)
        with spliced(model, module_path, rec):
            spl = model(input_ids=x)
        if causal:
            with spliced(model, module_path, torch.zeros_like):
                zero = model(input_ids=x)
            targets = x[:, 1:].reshape(-1)
            for name, out in (("clean", clean), ("spliced", spl), ("zero", zero)):
                logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).double()
                ce[name] += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
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
        denom = c["zero"] - c["clean"]
        return {
            "ce_clean": c["clean"],
            "ce_spliced": c["spliced"],
            "ce_zero_ablated": c["zero"],
            "ce_recovered": (c["zero"] - c["spliced"]) / denom if abs(denom) > 1e-12 else float("nan"),
            "kl_clean_spliced": kl_sum / n_tok,
        }
    return {"embedding_cosine": cos_sum / n_seq}
