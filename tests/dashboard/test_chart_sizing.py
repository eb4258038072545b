"""The Layers page's per-matrix chart is sized for the model: a few matrices get one labelled bar each
(every name, a fixed height per row: never a one-pixel strip), hundreds one cell per (block, role), and
a figure undefined everywhere says so instead of drawing nothing."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dashboard import charts


def _table(n: int, roles: tuple[str, ...] = ("attn", "mlp")) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "name": [f"block.{i // len(roles)}.{roles[i % len(roles)]}.weight" for i in range(n)],
            "layer": [i // len(roles) for i in range(n)],
            "role": [roles[i % len(roles)] for i in range(n)],
            "alpha": rng.uniform(2, 6, n),
            "anomaly": [i == 1 for i in range(n)],
        }
    )


def test_a_small_model_gets_a_labelled_bar_per_matrix_of_fixed_height() -> None:
    t = _table(4)
    t.loc[2, "alpha"] = math.nan  # undefined for one matrix: left out, not a zero bar
    spec = charts.column_bars(t, "alpha").to_dict()
    assert spec["mark"]["type"] == "bar" and spec["encoding"]["y"]["field"] == "name"
    assert spec["encoding"]["y"]["axis"]["labelOverlap"] is False  # every name shown
    shown = [r["name"] for r in spec["datasets"][spec["data"]["name"]]]
    assert shown == [t.name[0], t.name[1], t.name[3]]
    assert spec["height"] == charts.ROW_PX * 3 + 40


def test_a_large_model_gets_one_cell_per_block_and_role() -> None:
    t = _table(300, roles=("q", "k", "v", "o", "up", "down"))
    spec = charts.column_bars(t, "alpha").to_dict()
    assert spec["mark"]["type"] == "rect"
    assert spec["encoding"]["x"]["field"] == "layer" and spec["encoding"]["y"]["field"] == "role"
    assert spec["encoding"]["color"]["aggregate"] == "mean" and spec["encoding"]["color"]["field"] == "alpha"
    assert spec["height"] == charts.ROW_PX * 6


def test_a_figure_undefined_for_every_matrix_says_so() -> None:
    t = _table(4).assign(alpha=math.nan)
    spec = charts.column_bars(t, "alpha").to_dict()
    assert spec["mark"]["type"] == "text"
    (note,) = spec["datasets"][spec["data"]["name"]]
    assert "undefined for every matrix" in note["note"]
