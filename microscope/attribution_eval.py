"""The attribution stage's computation: which inputs drive the model's decisions and through which blocks,
on a seeded choice of the audit's samples. `evaluate_images` (a classifier on [N, C, H, W] images) and
`evaluate_text` (a causal LM's next token, or an encoder's retrieval score) return one JSON-serialisable
dict, the stage's results.json; `small` is what the record's details carry (no maps, no per-token lists).

Results dict: `kind` (images | causal | encoder), `samples` (dataset indices), `methods` (the settings that
ran), `per_sample` (one entry each), `layer_shares` ({block: share of |layer IG|}, summing to 1),
`randomisation` (Adebayo et al.'s check, or None), `undefined` ({figure: why it is absent}) and `figures`
(flat floats: completeness_max_rel, completeness_mean_rel, randomisation_spearman, top_block_share,
share_<block with dots as underscores>). The image helpers in microscope.attribution run on the CPU."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

from microscope import attribution as attr

if TYPE_CHECKING:
    import torch
    from schemas.config import AttributionConfig
    from torch import nn

MAX_SIDE = 64  # maps are mean-pooled to at most MAX_SIDE × MAX_SIDE for the results
TOP_TOKENS = 5  # the details keep each text's tokens with the largest |attribution|


def _sig(a: Any, digits: int = 5) -> Any:
    """`a` rounded to `digits` significant digits, as nested lists (a float for a scalar)."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.floor(np.log10(np.abs(a)))
        scale = np.where(np.isfinite(mag), 10.0 ** (digits - 1 - np.where(np.isfinite(mag), mag, 0)), 1.0)
        out = np.round(a * scale) / scale
    return np.where(np.isfinite(a) & (a != 0), out, a).tolist()


def _pool(maps: np.ndarray) -> np.ndarray:
    """[n, ..., H, W] mean-pooled to at most MAX_SIDE on each side."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(maps, dtype=torch.float32)
    h, w = t.shape[-2:]
    if h <= MAX_SIDE and w <= MAX_SIDE:
        return t.numpy()
    lead = t.shape[:-2]
    t = F.adaptive_avg_pool2d(t.reshape(-1, 1, h, w), (min(h, MAX_SIDE), min(w, MAX_SIDE)))
    return t.reshape(*lead, *t.shape[-2:]).numpy()


def _pick(n: int, k: int, seed: int) -> np.ndarray:
    if n == 0:
        raise ValueError("attribution: the dataset has no samples; add data or check the dataset section")
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def _figures(rel: np.ndarray, shares: dict[str, float], spearman: float | None) -> dict[str, float]:
    figs = {
        "samples": float(len(rel)),
        "completeness_max_rel": float(np.max(rel)),
        "completeness_mean_rel": float(np.mean(rel)),
    }
    if spearman is not None and np.isfinite(spearman):
        figs["randomisation_spearman"] = float(spearman)
    if shares:
        figs["top_block_share"] = max(shares.values())
        figs |= {"share_" + re.sub(r"[^0-9A-Za-z_]", "_", k): v for k, v in shares.items()}
    return figs


class _Logits:
    """A module returning `.logits` of an output that carries them (Hugging Face image classifiers)."""

    @staticmethod
    def wrap(model: nn.Module, x: torch.Tensor) -> nn.Module:
        import torch
        from torch import nn

        with torch.no_grad():
            out = model(x[:1])
        if isinstance(out, torch.Tensor):
            return model
        if getattr(out, "logits", None) is None:
            raise ValueError(
                f"attribution: the model returns {type(out).__name__} without logits; it must map images to [n, classes]"
            )

        class Head(nn.Module):
            def __init__(self, inner: nn.Module):
                super().__init__()
                self.inner = inner

            def forward(self, v: torch.Tensor) -> torch.Tensor:
                return self.inner(v).logits

        return Head(model).eval()


def evaluate_images(
    model: nn.Module, x: np.ndarray, y: np.ndarray, ac: AttributionConfig, seed: int, blocks: dict[str, nn.Module]
) -> dict[str, Any]:
    """Saliency, integrated gradients (with completeness), SmoothGrad, block shares and the randomisation
    check of an image classifier for its predicted class on `ac.samples` seeded images. CPU model."""
    import torch

    model.eval()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"attribution: images have shape {x.shape}; expected [N, C, H, W]")
    idx = _pick(len(x), ac.samples, seed)
    xs = torch.from_numpy(x[idx])  # [n, C, H, W]
    model = _Logits.wrap(model, xs)
    with torch.no_grad():
        logits = model(xs)
    if logits.ndim != 2:
        raise ValueError(f"attribution: the model returned shape {tuple(logits.shape)}, not logits [n, classes]")
    pred = logits.argmax(1)
    if ac.baseline == "mean":
        base: Any = torch.from_numpy(x.mean(0, keepdims=True))  # [1, C, H, W]: the whole dataset's mean image
        base_name = f"mean image of {len(x)} inputs"
    else:
        base, base_name = "zeros", "zeros"
    sal = attr.saliency(model, xs, pred)
    ig = attr.integrated_gradients(model, xs, pred, baseline=base, steps=ac.ig_steps)
    sg = attr.smoothgrad(model, xs, pred, sigma_share=ac.smoothgrad_sigma, samples=ac.smoothgrad_samples, seed=seed)
    shares = attr.layer_attribution_shares(model, xs, pred, blocks, steps=ac.layer_steps) if blocks else {}
    undefined = {} if blocks else {"top_block_share": "no blocks were given to attribute through"}
    rnd = None
    if not ac.randomisation:
        undefined["randomisation_spearman"] = "attribution.randomisation is false"
    else:
        try:
            rnd = attr.randomisation_check(model, xs, pred, method="saliency", seed=seed) | {"method": "saliency"}
        except ValueError as e:  # no nn.Linear head to re-initialise
            undefined["randomisation_spearman"] = str(e)
    summed = {  # [n, H, W]: channel-summed |attribution|
        "saliency": np.abs(sal).sum(1),
        "integrated_gradients": np.abs(ig["attributions"]).sum(1),
        "smoothgrad": np.abs(sg).sum(1),
    }
    pooled = {k: _pool(v) for k, v in summed.items()} | {"input": _pool(xs.numpy())}  # input: [n, C, h, w]
    gap = ig["attributions"].reshape(len(idx), -1).sum(1) - ig["delta"]  # F(x) − F(baseline), per sample
    per_sample = [
        {
            "index": int(i),
            "label": int(y[i]),
            "predicted": int(pred[j]),
            "logit": float(logits[j, pred[j]]),
            "gap": float(gap[j]),
            "delta": float(ig["delta"][j]),
            "relative_delta": float(ig["relative_delta"][j]),
            "maps": {k: _sig(v[j]) for k, v in pooled.items()},
        }
        for j, i in enumerate(idx)
    ]
    return {
        "kind": "images",
        "samples": idx.tolist(),
        "methods": {
            "ig_steps": ac.ig_steps,
            "ig_method": "gausslegendre",
            "baseline": base_name,
            "smoothgrad_samples": ac.smoothgrad_samples,
            "smoothgrad_sigma": ac.smoothgrad_sigma * float(xs.max() - xs.min()),
            "layer_steps": ac.layer_steps,
            "layer_baseline": "zeros",
            "target": "predicted class",
            "map_shape": list(x.shape[-2:]),
            "map_pooled_shape": list(pooled["saliency"].shape[-2:]),
        },
        "per_sample": per_sample,
        "layer_shares": shares,
        "randomisation": rnd,
        "undefined": undefined,
        "figures": _figures(np.asarray(ig["relative_delta"]), shares, rnd["spearman"] if rnd else None),
    }


# ---- text --------------------------------------------------------------------------------------


def _text_score(model: nn.Module, causal: bool) -> Any:
    """F(embeds[, query]) -> [n, V] or [n]: next-token logits at the last position (causal; Captum picks the
    target), or the cosine of the mean-pooled last hidden state with `query` (encoder; passed as a forward
    argument so Captum expands it with the interpolation steps)."""
    import torch

    def score(e: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        out = model(inputs_embeds=e, use_cache=False) if causal else model(inputs_embeds=e)
        if causal:
            return out.logits[:, -1, :]  # [n, V]
        h = out.last_hidden_state.mean(1)  # [n, d]: mean pooling (no padding in the windows)
        return torch.nn.functional.cosine_similarity(h, query, dim=-1)  # [n]

    return score


def _text_baseline(model: nn.Module, ids: np.ndarray, embeds: torch.Tensor, how: str) -> tuple[torch.Tensor, str]:
    import torch

    if how != "mean":
        return torch.zeros_like(embeds), "zero embeddings"
    table = model.get_input_embeddings().weight.detach()  # [V, d]
    counts = np.bincount(ids.ravel().astype(np.int64), minlength=table.shape[0])[: table.shape[0]]
    w = torch.as_tensor(counts / counts.sum(), dtype=table.dtype, device=table.device)
    return (w @ table).expand_as(embeds).contiguous(), f"mean token embedding over {int(counts.sum())} tokens"


def evaluate_text(
    model: nn.Module,
    ids: np.ndarray,
    ac: AttributionConfig,
    seed: int,
    causal: bool,
    blocks: dict[str, nn.Module],
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Per-token integrated gradients (on the input embeddings) of a causal LM's predicted next token at the
    last position, or of an encoder's retrieval score (cosine of the mean-pooled embedding with the text's
    own clean one, so the tokens that carry the embedding's direction), on `ac.samples` seeded windows cut
    to `ac.max_tokens`; completeness and per-block shares (layer IG). Runs on the model's device."""
    import torch
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    model.eval()
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"attribution: token windows have shape {ids.shape}; expected [N, T] with T ≥ 1")
    idx = _pick(len(ids), ac.samples, seed)
    t_len = min(ids.shape[1], ac.max_tokens)
    device = next(model.parameters()).device
    tok = torch.from_numpy(ids[idx, :t_len].astype(np.int64)).to(device)  # [n, t]
    embeds = model.get_input_embeddings()(tok).detach()  # [n, t, d]
    query, target = None, None
    with torch.no_grad():
        out = model(inputs_embeds=embeds, use_cache=False) if causal else model(inputs_embeds=embeds)
        if causal:
            if getattr(out, "logits", None) is None:
                raise ValueError("attribution: the causal model returns no logits; pass a *ForCausalLM model")
            target = out.logits[:, -1, :].argmax(-1)  # [n]: the predicted next token
        else:
            if getattr(out, "last_hidden_state", None) is None:
                raise ValueError("attribution: the encoder returns no last_hidden_state; pass a base encoder model")
            query = out.last_hidden_state.mean(1).detach()  # [n, d]: the text's own clean embedding
    score = _text_score(model, causal)
    extra = None if causal else (query,)
    base, base_name = _text_baseline(model, ids[:, :t_len], embeds, ac.baseline)
    chunk = max(len(idx), 64)  # forward passes per internal batch: bounded memory on a large model
    ig, delta = IntegratedGradients(score).attribute(
        embeds, baselines=base, target=target, additional_forward_args=extra, n_steps=ac.ig_steps,
        method="gausslegendre", internal_batch_size=chunk, return_convergence_delta=True,
    )  # fmt: skip
    scores = ig.sum(-1).detach().float().cpu().numpy()  # [n, t]: per-token attribution
    delta = delta.detach().float().cpu().numpy()
    with torch.no_grad():
        fx, fb = score(embeds, query), score(base, query)
        if causal:
            fx, fb = fx.gather(1, target[:, None]).squeeze(1), fb.gather(1, target[:, None]).squeeze(1)
    fx, fb = fx.float().cpu().numpy(), fb.float().cpu().numpy()
    rel = np.abs(delta) / np.maximum(np.abs(fx - fb), 1e-12)
    totals: dict[str, float] = {}
    for name, block in blocks.items():
        la = LayerIntegratedGradients(score, block).attribute(
            embeds, baselines=base, target=target, additional_forward_args=extra, n_steps=ac.layer_steps,
            method="gausslegendre", internal_batch_size=chunk,
        )  # fmt: skip
        parts = la if isinstance(la, tuple | list) else (la,)
        totals[name] = float(sum(p.detach().abs().sum() for p in parts if isinstance(p, torch.Tensor)))
    total = sum(totals.values())
    shares = {k: v / total for k, v in totals.items()} if total > 0 else {}
    undefined = {} if shares else {"top_block_share": "no blocks were given, or their attribution is zero"}
    randomised = None
    if not ac.randomisation:
        undefined["randomisation_spearman"] = "attribution.randomisation is off"
    elif not blocks:
        undefined["randomisation_spearman"] = "no blocks to re-initialise"
    else:
        ig_args = {"baselines": base, "target": target, "additional_forward_args": extra, "chunk": chunk}
        randomised = _text_randomisation(model, causal, embeds, ig_args, ac, list(blocks)[-1], seed, scores)

    def names(row: list[int]) -> list[str]:
        return (
            [str(t) for t in tokenizer.convert_ids_to_tokens(row)] if tokenizer is not None else [str(t) for t in row]
        )

    per_sample = []
    for j, i in enumerate(idx):
        row = tok[j].tolist()
        entry: dict[str, Any] = {
            "index": int(i), "tokens": names(row), "token_ids": row, "scores": _sig(scores[j]),
            "score": float(fx[j]), "baseline_score": float(fb[j]), "delta": float(delta[j]), "relative_delta": float(rel[j]),
        }  # fmt: skip
        if causal:
            entry["predicted"] = int(target[j])
            entry["predicted_token"] = names([int(target[j])])[0]
            if ids.shape[1] > t_len:  # the window's actual next token
                entry["next_token"] = names([int(ids[i, t_len])])[0]
        per_sample.append(entry)
    return {
        "kind": "causal" if causal else "encoder",
        "samples": idx.tolist(),
        "methods": {
            "ig_steps": ac.ig_steps,
            "ig_method": "gausslegendre",
            "baseline": base_name,
            "layer_steps": ac.layer_steps,
            "layer_baseline": base_name,
            "tokens": t_len,
            "target": "logit of the predicted next token at the last position"
            if causal
            else "cosine of the mean-pooled embedding with the text's own clean embedding",
        },
        "per_sample": per_sample,
        "layer_shares": shares,
        "randomisation": randomised,
        "undefined": undefined,
        "figures": _figures(rel, shares, randomised["spearman"] if randomised else None),
    }


def _text_randomisation(
    model: nn.Module,
    causal: bool,
    embeds: torch.Tensor,
    ig_args: dict[str, Any],
    ac: AttributionConfig,
    last: str,
    seed: int,
    before: np.ndarray,
) -> dict[str, Any]:
    """Adebayo et al.'s check for text: re-initialise the last block's matrices (N(0, their std), biases zeroed)
    in a copy, recompute the per-token IG of the same targets, Spearman of |scores| per text. The output
    head is not the one re-initialised: a causal LM's head is usually tied to its input embeddings."""
    import copy

    import torch
    from captum.attr import IntegratedGradients
    from scipy.stats import spearmanr

    rnd = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, p in rnd.get_submodule(last).named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, float(p.std()))
            elif name.endswith("bias"):
                p.zero_()
    after = IntegratedGradients(_text_score(rnd, causal)).attribute(
        embeds, baselines=ig_args["baselines"], target=ig_args["target"],
        additional_forward_args=ig_args["additional_forward_args"], n_steps=ac.ig_steps, method="gausslegendre",
        internal_batch_size=ig_args["chunk"],
    )  # fmt: skip
    after = after.sum(-1).detach().float().cpu().numpy()
    rhos = [spearmanr(np.abs(a), np.abs(b))[0] for a, b in zip(before, after, strict=True)]
    rho = float(np.nanmean(rhos)) if np.isfinite(rhos).any() else float("nan")
    passed = rho < 0.5
    verdict = "depend on" if passed else "barely change with"
    return {
        "spearman": rho,
        "passed": passed,
        "method": "integrated_gradients",
        "randomised": last,
        "meaning": f"The per-token attributions {verdict} the last block's weights (mean Spearman {rho:.2f} after "
        f"re-initialising {last}; below 0.5 passes).",
    }


def small(results: dict[str, Any]) -> dict[str, Any]:
    """What the record's details carry: results.json without the maps and the per-token lists (each text
    keeps its TOP_TOKENS tokens by |attribution|, with their positions)."""
    per_sample = []
    for s in results["per_sample"]:
        entry = {k: v for k, v in s.items() if k not in ("maps", "tokens", "token_ids", "scores")}
        if "scores" in s:
            sc = np.nan_to_num(np.asarray(s["scores"], dtype=np.float64))
            top = np.argsort(-np.abs(sc), kind="stable")[:TOP_TOKENS]
            entry["top_tokens"] = [{"position": int(p), "token": s["tokens"][p], "score": s["scores"][p]} for p in top]
        per_sample.append(entry)
    return {k: v for k, v in results.items() if k != "per_sample"} | {"per_sample": per_sample}
