"""Altair charts of the viewer (interactive Vega-Lite; each kept under MAX_POINTS points)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import altair as alt

if TYPE_CHECKING:
    import pandas as pd

MAX_POINTS = 10_000
ANOMALY = "#d62728"
NORMAL = "#4c78a8"


LABELLED = 60  # up to this many matrices, one labelled row each (horizontal bars); more: unlabelled bars
ROW_PX = 18


def column_bars(df: pd.DataFrame, column: str) -> alt.Chart:
    """The figure per weight matrix, sized for the model: up to LABELLED matrices one labelled horizontal
    bar each (every name shown, ROW_PX a row: a 4-matrix CNN gets a short chart, not a strip); more, one
    cell per (block, role) coloured by the figure (a 300-matrix model stays readable without scrolling).
    Matrices where the figure is undefined are left out; when it is undefined for all, the chart says so.
    Anomalous matrices in red."""
    import pandas as pd

    keep = ["name", "layer", column] + [c for c in ("anomaly", "role") if c in df.columns]
    data = df[keep].head(MAX_POINTS)
    data = data[pd.to_numeric(data[column], errors="coerce").notna()]
    if data.empty:
        note = pd.DataFrame({"note": [f"{column} is undefined for every matrix of this audit (the table says why)"]})
        return alt.Chart(note, title=column).mark_text(align="left", x=0).encode(text="note:N").properties(height=24)
    tooltip = ["name", "layer", alt.Tooltip(f"{_field(column)}:Q", title=column, format=".4g")]
    if len(data) > LABELLED and "role" in data.columns:
        return (
            alt.Chart(data, title=f"{column} by block and role (mean over the matrices of a cell)")
            .mark_rect()
            .encode(
                x=alt.X("layer:O", title="block"),
                y=alt.Y("role:N", title=None),
                color=alt.Color(f"mean({_field(column)}):Q", title=column, scale=alt.Scale(scheme="viridis")),
                tooltip=["layer", "role", alt.Tooltip(f"mean({_field(column)}):Q", title=column, format=".4g")],
            )
            .properties(height=max(80, ROW_PX * data["role"].nunique()))
        )
    color = (
        alt.condition(alt.datum.anomaly, alt.value(ANOMALY), alt.value(NORMAL))
        if "anomaly" in data.columns
        else alt.value(NORMAL)
    )
    value = alt.X(f"{_field(column)}:Q", title=column)
    if len(data) <= LABELLED:
        return (
            alt.Chart(data, title=column)
            .mark_bar()
            .encode(
                x=value,
                y=alt.Y(
                    "name:N", sort=None, title=None, axis=alt.Axis(labelLimit=320, labelOverlap=False, labelFontSize=11)
                ),
                color=color,
                tooltip=tooltip,
            )
            .properties(height=ROW_PX * len(data) + 40)
        )
    return (
        alt.Chart(data, title=column)
        .mark_bar()
        .encode(
            x=alt.X("name:N", sort=None, title=None, axis=alt.Axis(labels=False, ticks=False)),
            y=alt.Y(f"{_field(column)}:Q", title=column),
            color=color,
            tooltip=tooltip,
        )
        .properties(height=220)
    )


def step_lines(series: pd.DataFrame, column: str, step: int, title: str | None = None) -> alt.LayerChart:
    """`column` against `step` (titled `title`, else the column), with a rule at the selected step."""
    data = series[["step", column]].dropna().head(MAX_POINTS)
    line = (
        alt.Chart(data, title=title or column)
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y(f"{_field(column)}:Q", title=None, scale=alt.Scale(zero=False)),
            tooltip=["step", alt.Tooltip(f"{_field(column)}:Q", title=title or column, format=".4g")],
        )
    )
    rule = alt.Chart(alt.Data(values=[{"step": step}])).mark_rule(color=ANOMALY, strokeDash=[4, 3]).encode(x="step:Q")
    return alt.layer(line, rule).properties(height=180)


def paired_bars(df: pd.DataFrame, column: str, labels: tuple[str, str]) -> alt.Chart:
    """Two audits' `column` per matrix side by side on shared axes (`df`: name, which, value); horizontal
    and labelled up to LABELLED matrices."""
    data = df.head(MAX_POINTS)
    n = data["name"].nunique()
    which = alt.Color("which:N", sort=list(labels), title=None)
    tooltip = ["name", "which", alt.Tooltip("value:Q", format=".4g")]
    if n <= LABELLED:
        return (
            alt.Chart(data, title=column)
            .mark_bar()
            .encode(
                x=alt.X("value:Q", title=column),
                y=alt.Y("name:N", sort=None, title=None, axis=alt.Axis(labelLimit=260)),
                yOffset=alt.YOffset("which:N", sort=list(labels)),
                color=which,
                tooltip=tooltip,
            )
            .properties(height=max(80, 2 * ROW_PX * n))
        )
    return (
        alt.Chart(data, title=column)
        .mark_bar()
        .encode(
            x=alt.X("name:N", sort=None, title=None, axis=alt.Axis(labels=False, ticks=False)),
            xOffset=alt.XOffset("which:N", sort=list(labels)),
            y=alt.Y("value:Q", title=column),
            color=which,
            tooltip=tooltip,
        )
        .properties(height=220)
    )


def _field(column: str) -> str:
    """A column name as a Vega-Lite field (dots and brackets escaped)."""
    return column.replace(".", "\\.").replace("[", "\\[").replace("]", "\\]")


def memory_bars(memory: pd.DataFrame, formats: list[str]) -> alt.Chart:
    """Weight MiB per block, one bar per format side by side (block -1: outside the blocks)."""
    import pandas as pd

    long = pd.concat(
        [pd.DataFrame({"layer": memory["layer"], "format": f, "MiB": memory[f"bytes[{f}]"] / 2**20}) for f in formats]
    )
    return (
        alt.Chart(long.head(MAX_POINTS), title="weight memory per block")
        .mark_bar()
        .encode(
            x=alt.X("layer:O", title="block (-1: outside the blocks)"),
            xOffset=alt.XOffset("format:N", sort=formats),
            y=alt.Y("MiB:Q"),
            color=alt.Color("format:N", sort=formats),
            tooltip=["layer", "format", alt.Tooltip("MiB:Q", format=".3f")],
        )
        .properties(height=240)
    )


def by_layer(df: pd.DataFrame, column: str, title: str, color: str = "variant") -> alt.Chart:
    """`column` against the block index, one line per `color` value (and dash per hook kind)."""
    data = df.head(MAX_POINTS)
    enc = {"strokeDash": alt.StrokeDash("kind:N", title="hook")} if "kind" in data.columns else {}
    return (
        alt.Chart(data, title=title)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="block"),
            y=alt.Y(f"{_field(column)}:Q", title=column, scale=alt.Scale(zero=False)),
            color=alt.Color(f"{color}:N", title=None),
            tooltip=[color, "layer", alt.Tooltip(f"{_field(column)}:Q", title=column, format=".4g")],
            **enc,
        )
        .properties(height=220)
    )


def eps_curves(curves: pd.DataFrame, attack: str) -> alt.Chart:
    """Accuracy against ε for one attack, one line per variant."""
    data = curves[curves["attack"] == attack].head(MAX_POINTS)
    return (
        alt.Chart(data, title=f"{attack}: accuracy vs ε")
        .mark_line(point=True)
        .encode(
            x=alt.X("eps:Q", title="ε (box units)"),
            y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("variant:N", title=None),
            tooltip=["variant", alt.Tooltip("eps:Q", format=".4g"), alt.Tooltip("accuracy:Q", format=".3f")],
        )
        .properties(height=240)
    )


def reliability_diagram(bins: pd.DataFrame, title: str) -> alt.LayerChart:
    """Accuracy against confidence per bin (bars), the diagonal of perfect calibration, one colour per
    variant; empty bins are left out."""
    data = bins.dropna(subset=["accuracy"]).head(MAX_POINTS)
    bars = (
        alt.Chart(data, title=title)
        .mark_bar(opacity=0.55)
        .encode(
            x=alt.X("bin_lower:Q", title="confidence", scale=alt.Scale(domain=[0, 1])),
            x2="bin_upper:Q",
            y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("variant:N", title=None),
            tooltip=[
                "variant",
                alt.Tooltip("confidence:Q", format=".3f"),
                alt.Tooltip("accuracy:Q", format=".3f"),
                "count",
            ],  # fmt: skip
        )
    )
    diagonal = alt.Chart(alt.Data(values=[{"x": 0, "y": 0}, {"x": 1, "y": 1}])).mark_line(
        color="gray", strokeDash=[4, 4]
    )
    return (bars + diagonal.encode(x="x:Q", y="y:Q")).properties(height=260)


def roc_curves(points: pd.DataFrame, ood_set: str) -> alt.Chart:
    """True positive rate (in-distribution kept) against false positive rate (OOD accepted), one line per score."""
    data = points[points["ood_set"] == ood_set].head(MAX_POINTS)
    return (
        alt.Chart(data, title=f"ROC · {ood_set}")
        .mark_line()
        .encode(
            x=alt.X("fpr:Q", title="OOD accepted (FPR)", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("tpr:Q", title="in-distribution kept (TPR)", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("score:N", title=None),
        )
        .properties(height=260)
    )


def corruption_heatmap(table: pd.DataFrame, variant: str) -> alt.Chart:
    """Accuracy per corruption (rows) and severity (columns) of one variant."""
    data = table[table["variant"] == variant].head(MAX_POINTS)
    return (
        alt.Chart(data, title=f"accuracy under corruption · {variant}")
        .mark_rect()
        .encode(
            x=alt.X("severity:O"),
            y=alt.Y("corruption:N", title=None, sort=None),
            color=alt.Color("accuracy:Q", scale=alt.Scale(domain=[0, 1], scheme="viridis")),
            tooltip=["corruption", "severity", alt.Tooltip("accuracy:Q", format=".3f")],
        )
        .properties(height=max(200, 26 * data["corruption"].nunique()))  # every corruption labelled
    )


def projection(points: pd.DataFrame, step: int, domains: dict[str, list[float]], lo: int) -> alt.LayerChart:
    """The run's matrices on its first two principal components at `step`, on axes fixed for the whole run
    (so motion is change), each matrix's path from step `lo` fading behind it. Every step's points are in
    the data and a filter picks the step, so the spec differs between steps only in two numbers (see
    `template`)."""
    base = alt.Chart(points.head(MAX_POINTS))
    x = alt.X("pc1:Q", scale=alt.Scale(domain=domains["pc1"]), title="PC 1")
    y = alt.Y("pc2:Q", scale=alt.Scale(domain=domains["pc2"]), title="PC 2")
    paths = (
        base.transform_filter(f"datum.step >= {lo} && datum.step <= {step}")
        .mark_line(opacity=0.35)
        .encode(x=x, y=y, detail="name:N", order="step:Q", color=alt.Color("layer:O", legend=None))
    )
    dots = (
        base.transform_filter(f"datum.step == {step}")
        .mark_circle(size=70)
        .encode(
            x=x,
            y=y,
            color=alt.Color("layer:O", title="block"),
            tooltip=["name", "layer", "role", alt.Tooltip("pc1:Q", format=".3f"), alt.Tooltip("pc2:Q", format=".3f")],
        )
    )
    return alt.layer(paths, dots, title=f"layer statistics, step {step}").properties(height=360)


# A step-driven chart is built once per data with these stand-ins for the step (and the start of its
# trail), serialised, and re-aimed per step by text substitution: playback then costs a string replace
# and a JSON parse per chart, not Altair's ~50-200 ms of building and validating it.
STEP, STEP_LO = -987654321, -987654322


def template(chart: alt.TopLevelMixin) -> str:
    """`chart` (built with `STEP`/`STEP_LO` as its step) as Vega-Lite JSON text."""
    return chart.to_json(indent=None)


def at_step(spec: str, step: int, lo: int | None = None) -> dict[str, Any]:
    """A `template` aimed at `step` (and `lo`), ready for `st.vega_lite_chart`."""
    return json.loads(spec.replace(str(STEP_LO), str(step if lo is None else lo)).replace(str(STEP), str(step)))


OUTCOME_COLORS = {"pass": "#2ca02c", "warn": "#e6a700", "fail": ANOMALY, "skipped": "#c7c7c7"}


def gate_strip(history: pd.DataFrame) -> alt.Chart:
    """One row per rule, one cell per gated step, coloured by the rule's outcome there."""
    data = history.head(MAX_POINTS)
    return (
        alt.Chart(data, title="gate outcome per rule and step")
        .mark_rect(stroke="white")
        .encode(
            x=alt.X("step:O", title="step"),
            y=alt.Y("rule:N", title=None, sort=None),
            color=alt.Color(
                "outcome:N",
                scale=alt.Scale(domain=list(OUTCOME_COLORS), range=list(OUTCOME_COLORS.values())),
                title=None,
            ),
            tooltip=["step", "rule", "outcome", alt.Tooltip("compared:Q", format=".4g"), "offenders", "audit_id"],
        )
        .properties(height=max(80, 22 * data["rule"].nunique()))
    )


def sparsity_curve(pruned: pd.DataFrame, figure: str) -> alt.Chart:
    """A fidelity figure against the exact sparsity, one line per pruning method."""
    data = pruned[["variant", "method", "sparsity", figure]].dropna()
    return (
        alt.Chart(data, title=f"{figure} against sparsity")
        .mark_line(point=True)
        .encode(
            x=alt.X("sparsity:Q", axis=alt.Axis(format="%"), title="sparsity (share of pruned weights zeroed)"),
            y=alt.Y(f"{_field(figure)}:Q", title=figure),
            color=alt.Color("method:N"),
            tooltip=[
                "variant",
                alt.Tooltip("sparsity:Q", format=".2%"),
                alt.Tooltip(f"{_field(figure)}:Q", format=".4g"),
            ],
        )
        .properties(height=260)
    )


def mask_heatmap(grid: Any, title: str) -> alt.Chart:
    """A pruned matrix's mask pooled to blocks: the share of weights kept in each (rows: outputs)."""
    import pandas as pd

    rows = [{"row": i, "col": j, "kept": float(v)} for i, r in enumerate(grid) for j, v in enumerate(r)]
    return (
        alt.Chart(pd.DataFrame(rows), title=title)
        .mark_rect()
        .encode(
            x=alt.X("col:O", title="input block", axis=alt.Axis(labels=False, ticks=False)),
            y=alt.Y("row:O", title="output block", axis=alt.Axis(labels=False, ticks=False)),
            color=alt.Color("kept:Q", scale=alt.Scale(domain=[0, 1], scheme="greys", reverse=True), title="kept"),
            tooltip=["row", "col", alt.Tooltip("kept:Q", format=".1%")],
        )
        .properties(height=320)
    )
