"""Attack surfaces: every model as a classifier of inputs in the [0, 1] box, so one protocol (AutoAttack's
clamping included) serves images and text.

- Pixels: the classifier itself; inputs are images in [0, 1].
- Text: the attack acts on the input embeddings. Each embedding dimension d is mapped affinely onto
  [0, 1] by the range of the vocabulary's embeddings, u = (e − lo_d) / (hi_d − lo_d), and back inside the
  model; so the box is where real token embeddings live and an ε in box units is ε·(hi_d − lo_d) in
  embedding units. Inputs are [N, 1, T, d] (a channel axis, so AutoAttack's 4-D handling of a lone
  sample stays right). The classes are the next-token distribution at the last position (causal LMs) or,
  for encoders, a retrieval head: the cosine of the mean-pooled output to every sample's clean
  embedding (the anchors), so each input must stay nearest to its own clean embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

RETRIEVAL_TEMPERATURE = 0.05  # logits = cosine / τ: the argmax is unaffected; CE gradients are well scaled


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: that of its first floating-point parameter (int8 weights aside)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class PixelSurface(nn.Module):
    kind = "pixels"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pixels stay float32 in [0, 1]; a half-precision variant computes in its own dtype.
        return self.model(x.to(float_dtype(self.model))).float()

    def to_units(self, eps: float) -> float:
        return eps


class EmbeddingBox(nn.Module):
    """The affine map between a model's input-embedding space and the unit box."""

    def __init__(self, embedding: torch.Tensor):
        super().__init__()
        w = embedding.detach().float()
        lo, hi = w.min(0).values, w.max(0).values
        self.register_buffer("lo", lo)
        self.register_buffer("scale", (hi - lo).clamp_min(1e-6))

    def to_box(self, e: torch.Tensor) -> torch.Tensor:
        return (e - self.lo) / self.scale

    def from_box(self, u: torch.Tensor) -> torch.Tensor:
        return self.lo + u * self.scale


class _TextSurface(nn.Module):
    kind = "embeddings"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.box = EmbeddingBox(model.get_input_embeddings().weight)

    def inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, T] → their embeddings in box units [N, 1, T, d]."""
        with torch.no_grad():
            e = self.model.get_input_embeddings()(ids).float()
        return self.box.to_box(e).unsqueeze(1)

    def embeds(self, u: torch.Tensor) -> torch.Tensor:
        dtype = self.model.get_input_embeddings().weight.dtype
        e = self.box.from_box(u.squeeze(1))
        return e.to(dtype) if dtype.is_floating_point and dtype != torch.float32 else e

    def to_units(self, eps: float) -> float:
        """ε in box units as embedding units (the median dimension's range)."""
        return float(eps * self.box.scale.median())


class CausalSurface(_TextSurface):
    """Next-token logits at the last position."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=self.embeds(u), use_cache=False).logits[:, -1, :].float()


class RetrievalSurface(_TextSurface):
    """Cosine (÷ τ) between the mean-pooled output and the clean anchors; class i = sample i."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.register_buffer("anchors", torch.zeros(0))

    def pooled(self, u: torch.Tensor) -> torch.Tensor:
        out = self.model(inputs_embeds=self.embeds(u))
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return nn.functional.normalize(h.float().mean(1), dim=-1)

    def set_anchors(self, u: torch.Tensor, batch_size: int = 64) -> None:
        with torch.no_grad():
            self.anchors = torch.cat([self.pooled(u[i : i + batch_size]) for i in range(0, len(u), batch_size)])

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.pooled(u) @ self.anchors.T / RETRIEVAL_TEMPERATURE


def surface_for(model: nn.Module, modality: str, causal: bool) -> Any:
    if modality == "images":
        return PixelSurface(model)
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings to attack; robustness needs an HF text model")
    return CausalSurface(model) if causal else RetrievalSurface(model)


DEFAULT_EPS = {
    "pixels": {"Linf": 8 / 255, "L2": 0.5, "L1": 12.0},
    "embeddings": {"Linf": 0.02, "L2": 0.5, "L1": 4.0},
}
