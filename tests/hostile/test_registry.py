"""Every case of the battery has a test, and every test the map names exists (a renamed test or a dropped
parameter would otherwise leave a case silently untested)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.hostile.cases import CASES, EXPECTED

REPO = Path(__file__).resolve().parents[2]


def _tests_in(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_the_map_holds_the_123_cases_and_no_other() -> None:
    assert len(EXPECTED) == 123
    assert sorted(CASES) == sorted(EXPECTED), set(CASES) ^ set(EXPECTED)


def test_every_mapped_test_exists_with_its_case_parameter() -> None:
    for case, node in CASES.items():
        path, _, test = node.partition("::")
        name, _, param = test.partition("[")
        assert name in _tests_in(path), f"{case}: {node} does not exist"
        if param:  # a parametrised case: its id is a key of the module's case table
            assert f'"{param.rstrip("]")}"' in (REPO / path).read_text(), f"{case}: no parameter {param} in {path}"
