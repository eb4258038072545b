from __future__ import annotations

import pytest

from schemas.hooks import TL_NAMES, hook_name, hook_parts, is_hook_name, matrix_role


@pytest.mark.parametrize("hook", sorted(TL_NAMES))
def test_hook_names_made_and_parsed_round_trip(hook: str) -> None:
    name = hook_name(3, hook)
    assert name == f"blocks.3.{TL_NAMES[hook]}"
    assert is_hook_name(name)
    assert hook_parts(name) == (3, hook)


@pytest.mark.parametrize("name", ["blocks.x.hook_resid_post", "blocks.1.hook_resid_pre", "h.1.hook_mlp_out", ""])
def test_other_names_are_not_hook_names(name: str) -> None:
    assert not is_hook_name(name)


def test_matrix_role_is_the_name_inside_the_block() -> None:
    assert matrix_role("transformer.h.3.mlp.c_fc.weight") == "mlp.c_fc"
    assert matrix_role("lm_head.weight") == "lm_head"
