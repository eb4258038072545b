"""Names of the points in a model: hook names made, parsed and checked in one place.

A traced point is named TransformerLens-style, `blocks.<layer>.hook_resid_post | hook_mlp_out |
hook_attn_out`; the name is also the activation dataset's folder and the key of every per-hook figure in
the records. A weight matrix is named by its state-dict name, and its role is its name inside the block.
"""

from __future__ import annotations

import re

TL_NAMES = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
HOOK_PATTERN = r"blocks\.\d+\.hook_(resid_post|mlp_out|attn_out)"


def hook_name(layer: int, hook: str) -> str:
    """TransformerLens-style name, e.g. blocks.3.hook_resid_post: also the dataset's folder name."""
    return f"blocks.{layer}.{TL_NAMES[hook]}"


def is_hook_name(name: str) -> bool:
    """Whether `name` is a hook name as `hook_name` makes them."""
    return re.fullmatch(HOOK_PATTERN, name) is not None


def hook_parts(hook_name: str) -> tuple[int, str]:
    """'blocks.2.hook_resid_post' -> (2, 'resid')."""
    return int(hook_name.split(".")[1]), hook_name.rsplit("_", 1)[0].split("hook_")[-1]


def matrix_role(name: str) -> str:
    """The matrix's name inside its block: 'transformer.h.3.mlp.c_fc.weight' -> 'mlp.c_fc'."""
    return re.sub(r"^.*?\.\d+\.", "", name).removesuffix(".weight")
