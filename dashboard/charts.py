"""Altair charts of the viewer (interactive Vega-Lite; each kept under MAX_POINTS points)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import altair as alt

if TYPE_CHECKING:
    import pandas as pd

MAX_POINTS = 10_000
ANOMALY = "#d62728"
NORMAL = "#4c78a8"


def column_bars(df: pd.DataFrame, column: str) -> alt.Chart:
    """One bar per row (weight matrix) in table order, anomalous rows in red; the first MAX_POINTS rows."""
    data = df[["name", "layer", column] + (["anomaly"] if "anomaly" in df.columns else [])].head(MAX_POINTS)
    color = (
        alt.condition(alt.datum.anomaly, alt.value(ANOMALY), alt.value(NORMAL))
        if "anomaly" in data.columns
        else alt.value(NORMAL)
    )
    return (
        alt.Chart(data, title=column)
        .mark_bar()
        .encode(
            x=alt.X("name:N", sort=None, title=None, axis=alt.Axis(labels=len(data) <= 60, labelLimit=160)),
            y=alt.Y(f"{_field(column)}:Q", title=column),
            color=color,
            tooltip=["name", "layer", alt.Tooltip(f"{_field(column)}:Q", title=column, format=".4g")],
        )
        .properties(height=220)
    )


def step_lines(series: pd.DataFrame, column: str, step: int) -> alt.LayerChart:
    """`column` against `step`, with a rule at the selected step."""
    data = series[["step", column]].dropna().head(MAX_POINTS)
    line = (
        alt.Chart(data, title=column)
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y(f"{_field(column)}:Q", title=None, scale=alt.Scale(zero=False)),
            tooltip=["step", alt.Tooltip(f"{_field(column)}:Q", title=column, format=".4g")],
        )
    )
    rule = alt.Chart(alt.Data(values=[{"step": step}])).mark_rule(color=ANOMALY, strokeDash=[4, 3]).encode(x="step:Q")
    return alt.layer(line, rule).properties(height=180)


def paired_bars(df: pd.DataFrame, column: str, labels: tuple[str, str]) -> alt.Chart:
    """Two audits' `column` per matrix side by side on shared axes (`df`: name, which, value)."""
    data = df.head(MAX_POINTS)
    return (
        alt.Chart(data, title=column)
        .mark_bar()
        .encode(
            x=alt.X("name:N", sort=None, title=None, axis=alt.Axis(labels=data["name"].nunique() <= 60)),
            xOffset=alt.XOffset("which:N", sort=list(labels)),
            y=alt.Y("value:Q", title=column),
            color=alt.Color("which:N", sort=list(labels), title=None),
            tooltip=["name", "which", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(height=220)
    )


def _field(column: str) -> str:
    """A column name as a Vega-Lite field (dots and brackets escaped)."""
    return column.replace(".", "\\.").replace("[", "\\[").replace("]", "\\]")
