"""Torch-native weight-only int8: per-output-channel symmetric int8 weights with fp32 scales.

For where bitsandbytes cannot run. Plain tensors (int8 weight + fp32 scale), so the variant saves as
safetensors and runs on any device torch supports.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """y = x @ (W_int8 * scale)ᵀ + b, W quantized per output row to [-127, 127]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()  # [out, in]
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # [out, 1]
        self.register_buffer("weight_int8", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.squeeze(1))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None]  # dequantize: [out, in]
        return nn.functional.linear(x, w, self.bias)


def linear_weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of an nn.Linear or a transformers Conv1D (which stores [in, out])."""
    if isinstance(mod, nn.Linear):
        return mod.weight, mod.bias
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return mod.weight.t(), mod.bias
    return None


def quantize_linears(model: nn.Module, skip: set[str]) -> int:
    """Replace every Linear/Conv1D (except the names in `skip`) by an Int8Linear; returns how many."""
    targets = [(n, m) for n, m in model.named_modules() if n not in skip and linear_weight(m) is not None]
    for name, mod in targets:
        w, b = linear_weight(mod)  # type: ignore[misc]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(w, b))
    return len(targets)
