"""Attribution maps for image classifiers and causal LMs, on Captum: saliency, integrated gradients (with
their completeness check), SmoothGrad, per-layer shares, per-token scores, and Adebayo et al.'s (2018)
model-randomisation sanity check. Models should be in eval mode: dropout makes every map random."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn


def _inputs(model: nn.Module, x: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x as float32 [n, C, H, W], target as a long tensor [n] in range, and the logits F(x)."""
    import torch

    x = torch.as_tensor(x, dtype=torch.float32).detach().clone()  # Captum toggles requires_grad on it
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; pass a non-empty float batch [n, C, H, W]")
    t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        t = t.expand(x.shape[0])  # one class for the whole batch
    if t.numel() != x.shape[0]:
        raise ValueError(f"{t.numel()} targets for {x.shape[0]} samples; pass one class index per sample")
    with torch.no_grad():
        logits = model(x)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"the model returned shape {tuple(logits.shape)}; it must map [n, C, H, W] to [n, classes]")
    if int(t.min()) < 0 or int(t.max()) >= logits.shape[1]:
        raise ValueError(f"targets must lie in [0, {logits.shape[1]}); got {t.tolist()}")
    return x, t.contiguous(), logits


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


def saliency(model: nn.Module, x: Any, target: Any) -> np.ndarray:
    """|∂F_target/∂x| per input element (Simonyan et al. 2014), shape of x."""
    from captum.attr import Saliency

    x, t, _ = _inputs(model, x, target)
    return Saliency(model).attribute(x.requires_grad_(), target=t, abs=True).detach().numpy()


def _baseline(x: torch.Tensor, baseline: Any) -> tuple[torch.Tensor, str]:
    import torch

    if isinstance(baseline, torch.Tensor):
        b = baseline.to(torch.float32)
        if b.shape != x.shape and b.shape != (1, *x.shape[1:]):
            raise ValueError(f"baseline has shape {tuple(b.shape)}; pass {tuple(x.shape)} or [1, C, H, W]")
        return b.expand_as(x), "given"
    if baseline == "zeros":
        return torch.zeros_like(x), "zeros"
    if baseline == "mean":
        return x.mean(0, keepdim=True).expand_as(x), "mean image"
    raise ValueError(f"baseline {baseline!r} is unknown; pass 'zeros', 'mean' or a tensor shaped like x")


def integrated_gradients(
    model: nn.Module, x: Any, target: Any, baseline: str | torch.Tensor = "zeros", steps: int = 64
) -> dict[str, Any]:
    """Integrated gradients (Sundararajan et al. 2017) along the straight path from the baseline, with
    Gauss-Legendre quadrature of `steps` nodes. `delta` = Σ attr − (F(x) − F(baseline)) per sample is
    the completeness error; `relative_delta` divides it by |F(x) − F(baseline)|, so it reads as the
    quadrature's relative error. `baseline` is "zeros", "mean" (the batch's mean image) or a tensor."""
    import torch
    from captum.attr import IntegratedGradients

    x, t, logits = _inputs(model, x, target)
    _positive("steps", steps)
    b, described = _baseline(x, baseline)
    attr, delta = IntegratedGradients(model).attribute(
        x, baselines=b, target=t, n_steps=steps, method="gausslegendre", return_convergence_delta=True
    )
    with torch.no_grad():
        gap = (logits - model(b)).gather(1, t[:, None]).squeeze(1)
    return {
        "attributions": attr.detach().numpy(),
        "delta": delta.detach().numpy(),
        "relative_delta": (delta.abs() / gap.abs().clamp_min(1e-12)).detach().numpy(),
        "baseline": described,
    }


def smoothgrad(
    model: nn.Module, x: Any, target: Any, sigma_share: float = 0.15, samples: int = 16, seed: int = 0
) -> np.ndarray:
    """SmoothGrad (Smilkov et al. 2017): the mean |gradient| over `samples` noisy copies of x, noise
    σ = sigma_share × (x.max() − x.min()). Both are set explicitly because Captum's NoiseTunnel defaults
    (5 samples, σ = 1.0 absolute) ignore the input's range. Seeded without touching the caller's RNG."""
    import torch
    from captum.attr import NoiseTunnel, Saliency

    x, t, _ = _inputs(model, x, target)
    _positive("samples", samples)
    if not sigma_share > 0:
        raise ValueError(f"sigma_share must be positive; got {sigma_share!r}")
    stdev = sigma_share * float(x.max() - x.min())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attr = NoiseTunnel(Saliency(model)).attribute(
            x, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev, target=t
        )
    return attr.detach().numpy()


def layer_attribution_shares(
    model: nn.Module, x: Any, target: Any, layers: dict[str, nn.Module], steps: int = 32
) -> dict[str, float]:
    """Share of attribution per block: for each named layer, layer integrated gradients (zero input
    baseline) summed in absolute value over the layer's output and the samples, normalised to sum to 1."""
    import torch
    from captum.attr import LayerIntegratedGradients

    x, t, _ = _inputs(model, x, target)
    _positive("steps", steps)
    if not layers:
        raise ValueError("layers is empty; pass {name: module} for at least one module of the model")
    totals = {}
    for name, layer in layers.items():
        attr = LayerIntegratedGradients(model, layer).attribute(x, target=t, n_steps=steps, method="gausslegendre")
        parts = attr if isinstance(attr, tuple | list) else (attr,)
        totals[name] = float(sum(torch.as_tensor(p).detach().abs().sum() for p in parts))
    total = sum(totals.values())
    if total <= 0:
        raise ValueError("every layer's attribution is zero; pass a target the model's output depends on")
    return {name: v / total for name, v in totals.items()}


_MAPS = {"saliency", "integrated_gradients", "smoothgrad"}


def _map(model: nn.Module, x: torch.Tensor, t: torch.Tensor, method: str) -> np.ndarray:
    if method == "saliency":
        return saliency(model, x, t)
    if method == "smoothgrad":
        return smoothgrad(model, x, t)
    return integrated_gradients(model, x, t)["attributions"]


def randomisation_check(
    model: nn.Module, x: Any, target: Any, method: str = "saliency", seed: int = 0
) -> dict[str, Any]:
    """Model-parameter randomisation test (Adebayo et al. 2018): re-initialise the output head (the last
    nn.Linear) of a deep copy with N(0, std of its trained weights), zero bias, and compare |maps|
    by Spearman rank correlation per sample. A map that survives randomisation does not explain the
    model. `passed` means the mean correlation is below 0.5. The caller's model is untouched."""
    import torch
    from scipy.stats import spearmanr
    from torch import nn

    if method not in _MAPS:
        raise ValueError(f"method {method!r} is unknown; pass one of {sorted(_MAPS)}")
    x, t, _ = _inputs(model, x, target)
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError("the model has no nn.Linear; the check re-initialises the last one (the output head)")
    before = _map(model, x, t, method)
    randomised = copy.deepcopy(model)
    head = [m for m in randomised.modules() if isinstance(m, nn.Linear)][-1]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        nn.init.normal_(head.weight, std=float(head.weight.std()))
        if head.bias is not None:
            head.bias.zero_()
    after = _map(randomised, x, t, method)
    rhos = [spearmanr(np.abs(a).ravel(), np.abs(b).ravel())[0] for a, b in zip(before, after, strict=True)]
    rho = float(np.nanmean(rhos))  # nan where a map is constant: no ranking to compare
    passed = rho < 0.5
    verdict = "depend on" if passed else "barely change with"
    return {
        "spearman": rho,
        "passed": passed,
        "meaning": f"The {method} maps {verdict} the output head's weights (mean Spearman {rho:.2f} after "
        "randomising it; below 0.5 passes).",
    }


def token_attributions(
    model: nn.Module, input_ids: Any, target_position: int, target_token: int, steps: int = 32
) -> np.ndarray:
    """Per-token integrated gradients of a Hugging Face causal LM's logit for `target_token` at
    `target_position`, summed over the embedding dimension: shape of input_ids ([seq] or [n, seq]).

    The baseline is the zero embedding (positions still embedded), so the scores sum to ≈ logit(x) −
    logit(zero embeddings). Captum's LayerIntegratedGradients takes baselines as input ids, which cannot
    express a zero embedding; integrating the output of model.get_input_embeddings() from zero is the
    same quantity, so this runs IntegratedGradients on inputs_embeds."""
    import torch
    from captum.attr import IntegratedGradients

    _positive("steps", steps)
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    squeeze = ids.ndim == 1
    ids = ids[None] if squeeze else ids
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids has shape {tuple(ids.shape)}; pass token ids [seq] or [n, seq]")
    if not -ids.shape[1] <= target_position < ids.shape[1]:
        raise ValueError(f"target_position {target_position} is outside a sequence of {ids.shape[1]} tokens")
    if not 0 <= target_token < model.config.vocab_size:
        raise ValueError(f"target_token {target_token} is outside the vocabulary; pass a token id")
    embeds = model.get_input_embeddings()(ids).detach()

    def logit(e: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=e).logits[:, target_position, target_token]

    attr = IntegratedGradients(logit).attribute(
        embeds, baselines=torch.zeros_like(embeds), n_steps=steps, method="gausslegendre"
    )
    scores = attr.sum(-1).detach().numpy()
    return scores[0] if squeeze else scores
