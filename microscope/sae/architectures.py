"""SAE architectures behind one interface, registered by name (the name is saved in cfg.json).

Shapes follow SAELens: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in];
pre-activations are (x − b_dec) W_enc + b_enc. Decoder rows are kept at unit norm during training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

REGISTRY: dict[str, type[SAE]] = {}


def register(name: str):
    def deco(cls: type[SAE]) -> type[SAE]:
        if name in REGISTRY:
            raise ValueError(f"SAE architecture {name!r} is already registered")
        cls.architecture = name
        REGISTRY[name] = cls
        return cls

    return deco


@dataclass
class SAEOutput:
    recon: torch.Tensor  # [batch, d_in]
    acts: torch.Tensor  # [batch, d_sae] feature activations
    pre: torch.Tensor  # [batch, d_sae] pre-activations


class SAE(nn.Module):
    architecture = "base"

    def __init__(self, d_in: int, d_sae: int, **hp: Any):
        super().__init__()
        self.d_in, self.d_sae, self.hp = d_in, d_sae, hp
        w = torch.empty(d_sae, d_in)
        nn.init.kaiming_uniform_(w)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)  # [d_sae, d_in], unit rows
        self.W_enc = nn.Parameter(w.t().clone())  # [d_in, d_sae], tied at init
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc  # [batch, d_sae]

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.W_dec + self.b_dec  # [batch, d_in]

    def forward(self, x: torch.Tensor) -> SAEOutput:
        pre = self.pre_acts(x)
        acts = self.activate(pre)
        return SAEOutput(self.decode(acts), acts, pre)

    def loss(self, x: torch.Tensor, out: SAEOutput, step: int, dead: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """`total` plus its parts. mse is the per-token squared error summed over d_in, averaged."""
        mse = (out.recon - x).pow(2).sum(-1).mean()
        return {"total": mse, "mse": mse}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each decoder row, so the unit-norm step is a rotation."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec.data / self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    def inference_threshold(self) -> torch.Tensor | None:
        """Per-latent threshold for a JumpReLU export (None: not exported as JumpReLU)."""
        return None


def topk_acts(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest pre-activations (ReLU'd), zero elsewhere."""
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())


def aux_k_loss(x: torch.Tensor, out: SAEOutput, W_dec: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Auxiliary loss reviving dead latents (Gao et al. 2024, as SAELens computes it): reconstruct the
    residual x − x̂ from the top-k_aux dead latents, scaled by min(n_dead / k_aux, 1)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    k = min(k_aux, n_dead)
    residual = (x - out.recon).detach()  # [batch, d_in]
    masked = torch.where(dead[None, :], out.pre, torch.full_like(out.pre, -torch.inf))
    vals, idx = masked.topk(k, dim=-1)
    acts = torch.zeros_like(out.pre).scatter_(-1, idx, vals.relu())
    recons = acts @ W_dec  # no decoder bias: the residual has none
    return min(n_dead / k_aux, 1.0) * (recons - residual).pow(2).sum(-1).mean()


@register("topk")
class TopKSAE(SAE):
    def __init__(
        self, d_in: int, d_sae: int, k: int = 32, aux_k: int | None = None, aux_coef: float = 1 / 32, **hp: Any
    ):
        super().__init__(d_in, d_sae, **hp)
        self.k, self.aux_k, self.aux_coef = k, aux_k or max(1, d_in // 2), aux_coef

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_acts(pre, self.k)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """Decode sparsely: embedding_bag sums the k chosen decoder rows (weights = activations), so the
        decoder costs O(k · d_in) per token, forward and backward, instead of a dense [d_sae, d_in] matmul."""
        pre = self.pre_acts(x)  # [batch, d_sae]
        vals, idx = pre.topk(self.k, dim=-1)  # [batch, k]
        vals = vals.relu()
        recon = nn.functional.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec
        acts = torch.zeros_like(pre).scatter(-1, idx, vals)
        return SAEOutput(recon, acts, pre)

    def loss(self, x, out, step, dead):
        parts = super().loss(x, out, step, dead)
        if dead is not None and self.training:
            parts["aux"] = aux_k_loss(x, out, self.W_dec, dead, self.aux_k)
            parts["total"] = parts["total"] + self.aux_coef * parts["aux"]
        return parts


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Top k·batch activations across the whole batch (Bussmann et al. 2024); at inference a learned
    threshold (running mean of the smallest kept activation) makes it a JumpReLU."""

    forward = SAE.forward  # a batch-wide selection: dense activations, not TopK's per-row sparse decode

    def __init__(self, d_in: int, d_sae: int, k: int = 32, threshold_momentum: float = 0.99, **hp: Any):
        super().__init__(d_in, d_sae, k=k, **hp)
        self.momentum = threshold_momentum
        self.register_buffer("threshold", torch.tensor(-1.0))  # <0: not estimated yet

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if not self.training and self.threshold >= 0:
            return pre * (pre > self.threshold)
        flat = pre.relu().flatten()
        vals, idx = flat.topk(min(self.k * pre.shape[0], flat.numel()))
        acts = torch.zeros_like(flat).scatter_(0, idx, vals).view_as(pre)
        if self.training:
            with torch.no_grad():
                kept = vals[vals > 0]
                if kept.numel():
                    low = kept.min()
                    self.threshold.copy_(
                        low if self.threshold < 0 else self.momentum * self.threshold + (1 - self.momentum) * low
                    )
        return acts

    def inference_threshold(self) -> torch.Tensor | None:
        return self.threshold.clamp_min(0).expand(self.d_sae).clone()


@register("relu")
class ReLUSAE(SAE):
    """ReLU with an L1 penalty weighted by decoder norms, β warmed up linearly over `l1_warmup_steps`."""

    def __init__(self, d_in: int, d_sae: int, l1_coef: float = 5.0, l1_warmup_steps: int = 0, **hp: Any):
        super().__init__(d_in, d_sae, **hp)
        self.l1_coef, self.l1_warmup_steps = l1_coef, l1_warmup_steps

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def l1_weight(self, step: int) -> float:
        if self.l1_warmup_steps <= 0:
            return self.l1_coef
        return self.l1_coef * min(1.0, (step + 1) / self.l1_warmup_steps)

    def loss(self, x, out, step, dead):
        parts = super().loss(x, out, step, dead)
        parts["l1"] = (out.acts * self.W_dec.norm(dim=1)).sum(-1).mean()
        parts["total"] = parts["total"] + self.l1_weight(step) * parts["l1"]
        return parts


class _JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ); d/dθ by a rectangle-kernel straight-through estimate (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        near = ((pre - theta).abs() < eps / 2).to(g.dtype)
        g_pre = g * (pre > theta)
        g_theta = (-(theta / eps) * near * g).sum(0)
        return g_pre, g_theta, None


class _Step(torch.autograd.Function):
    """H(pre − θ) with the same estimator: the differentiable L0."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.eps / 2).to(g.dtype)
        return None, (-(1.0 / ctx.eps) * near * g).sum(0), None


@register("jumprelu")
class JumpReLUSAE(SAE):
    def __init__(
        self,
        d_in: int,
        d_sae: int,
        l0_coef: float = 1e-3,
        init_threshold: float = 1e-3,
        bandwidth: float = 1e-3,
        **hp: Any,
    ):
        super().__init__(d_in, d_sae, **hp)
        self.l0_coef, self.bandwidth = l0_coef, bandwidth
        self.log_threshold = nn.Parameter(torch.full((d_sae,), float(torch.tensor(init_threshold).log())))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(pre, self.threshold, self.bandwidth)

    def loss(self, x, out, step, dead):
        parts = super().loss(x, out, step, dead)
        parts["l0"] = _Step.apply(out.pre, self.threshold, self.bandwidth).sum(-1).mean()
        parts["total"] = parts["total"] + self.l0_coef * parts["l0"]
        return parts

    def inference_threshold(self) -> torch.Tensor | None:
        return self.threshold.detach().clone()


def build(architecture: str, d_in: int, d_sae: int, **hp: Any) -> SAE:
    if architecture not in REGISTRY:
        raise ValueError(f"unknown SAE architecture {architecture!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[architecture](d_in, d_sae, **hp)
