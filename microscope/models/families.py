"""A registry of model families: where the blocks are and which children are attention and MLP.

Each entry maps HF `config.model_type` names to module paths relative to one block. Adding a family is
one `register(...)` call; registering a model_type twice is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # ModuleList path suffix, e.g. "h" or "encoder.layer"
    attn: str | None  # path inside a block whose output is the attention's write to the residual
    mlp: str | None  # path inside a block whose output is the MLP's write to the residual
    causal: bool
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


_FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    for mt in family.model_types:
        if mt in _BY_MODEL_TYPE:
            raise ValueError(f"model_type {mt!r} already belongs to family {_BY_MODEL_TYPE[mt].name!r}")
        _BY_MODEL_TYPE[mt] = family
    _FAMILIES[family.name] = family
    return family


register(Family("gpt2", ("gpt2",), blocks="h", attn="attn", mlp="mlp", causal=True))
register(
    Family(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "phi3", "smollm3"),
        blocks="layers",
        attn="self_attn",
        mlp="mlp",
        causal=True,
    )
)
register(
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta", "electra", "camembert"),
        blocks="encoder.layer",
        # Post-LN blocks: the dense projections are what each sublayer adds before the add & norm.
        attn="attention.output.dense",
        mlp="output.dense",
        causal=False,
        notes="post-LN: attn/mlp are the sublayer outputs before the residual add and LayerNorm",
    )
)
register(Family("gpt_neox", ("gpt_neox",), blocks="layers", attn="attention", mlp="mlp", causal=True))

GENERIC = Family("generic", (), blocks="", attn=None, mlp=None, causal=False)
_GENERIC_ATTN = ("self_attn", "attn", "attention")
_GENERIC_MLP = ("mlp", "ffn", "feed_forward")


def family_for(model: nn.Module) -> Family:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    return _BY_MODEL_TYPE.get(mt, GENERIC) if mt else GENERIC


def find_blocks(model: nn.Module, family: Family) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: by the family's suffix, else the longest ModuleList."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if family.blocks:
        for name, mod in sorted(lists, key=lambda nm: len(nm[0])):
            if name == family.blocks or name.endswith("." + family.blocks):
                return name, mod
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to trace")
    return max(lists, key=lambda nm: (len(nm[1]), -len(nm[0])))


def child_path(block: nn.Module, family: Family, kind: str) -> str | None:
    """Path inside a block for 'attn' or 'mlp'; None where the block has none."""
    path = family.attn if kind == "attn" else family.mlp
    names = dict(block.named_modules())
    if family is not GENERIC:
        return path if path in names else None
    for cand in _GENERIC_ATTN if kind == "attn" else _GENERIC_MLP:
        if cand in names:
            return cand
    return None


def all_families() -> dict[str, Family]:
    return dict(_FAMILIES)
