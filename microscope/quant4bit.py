"""bitsandbytes 4-bit layers (nf4, fp4) on CPU: the stored 4-bit weight, dequantized and multiplied in
float on every call.

bitsandbytes' own CPU path for `Linear4bit` depends on the host. On CPUs with AVX512-BF16 the first
no-grad forward in eval mode repacks the weight in place and from then on runs a fused kernel that
casts the input and the block scales to bfloat16, has no autograd (attacks through the model fail),
and only takes layers whose input width is a multiple of 64 and output width a multiple of 32.
Elsewhere it dequantizes and calls `F.linear`. Running the second path on every CPU keeps the figures
the same on every host, equal to the format's own dequantization (blocks of 64 over the flattened
weight, as bitsandbytes stores it on GPU), any layer width, and gradients w.r.t. the input.
"""

from __future__ import annotations

from math import prod
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn


def dequantize(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (`packed`: two codes a byte, high nibble first; `state`: its QuantState)
    as floats of `state.shape` and `state.dtype`: code value × the absmax of its block of `blocksize`
    over the flattened weight, a nested (8-bit, `compress_statistics`) absmax dequantized first.

    bitsandbytes' `dequantize_4bit` computes this with a native kernel on CPU; on AVX512 hosts that kernel
    takes the blocks along each row, so a layer narrower than a block (or not a multiple of it) comes out
    wrong (errors of 30 % on a 32-wide layer here). This is the format's definition in torch, the same as
    bitsandbytes' reference (`backends/default`), on any host."""
    absmax = state.absmax
    if state.nested:  # 8-bit blockwise absmax: its code × the absmax of its block, plus the offset
        s2 = state.state2
        a = s2.code.to(absmax.device)[absmax.long()]
        a = a * s2.absmax.float().repeat_interleave(s2.blocksize)[: a.numel()]
        absmax = a + state.offset
    n = prod(state.shape)
    flat = packed.reshape(-1).view(torch.uint8)
    idx = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)[:n].long()
    values = state.code.to(flat.device).float()[idx]
    scale = absmax.float().repeat_interleave(state.blocksize)[:n]
    return (values * scale).reshape(state.shape).to(state.dtype)


class DequantLinear4bit(bnb.nn.Linear4bit):
    """A `Linear4bit` whose forward is y = x @ dequantize(W)ᵀ + b in the compute dtype.

    A subclass rather than a wrapper, so its state dict, `save_pretrained` and `isinstance` checks in
    transformers stay bitsandbytes'. The float weight exists only during the call: memory stays 4-bit.
    """

    kernel_path = "dequantize-matmul"  # what quantization.kernel_paths counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes' CPU kernel repacked this layer (its absmax layout differs) before it was swapped.
            raise RuntimeError(
                "DequantLinear4bit: weight was repacked by bitsandbytes' CPU kernel; swap before any forward"
            )
        compute = self.compute_dtype or x.dtype
        w = dequantize(self.weight.data, state).to(compute)  # [out, in]
        bias = None if self.bias is None else self.bias.to(compute)
        return nn.functional.linear(x.to(compute), w, bias).to(x.dtype)


def dequantize_matmul(model: nn.Module) -> int:
    """Turn every bitsandbytes `Linear4bit` of `model` into a `DequantLinear4bit`, in place, before its
    first forward; returns how many."""
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, bnb.nn.Linear4bit) or isinstance(mod, DequantLinear4bit):
            continue
        if getattr(mod.weight.quant_state, "packing_format_for_cpu", False) or "forward" in vars(mod):
            raise RuntimeError(
                f"{name}: already repacked by bitsandbytes' CPU kernel or its forward is wrapped (accelerate "
                "offload hook); load the variant anew and convert it before running it"
            )
        # Same object, new class (the subclass adds no state): Params4bit's back-reference to its module,
        # tied parameters and registered hooks all stay valid, and nothing is reallocated.
        mod.__class__ = DequantLinear4bit
        n += 1
    return n
