"""Chart functions shared by the HTML report and the viewer: each returns a matplotlib Figure (the viewer
shows it with st.pyplot), and `to_svg` inlines one into the report.

matplotlib is imported inside the functions: importing the CLI must stay fast. Figures are built on
the Agg canvas directly, never through pyplot, so no GUI backend is chosen and no global figure list
grows in a long-running process.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure

Series = Mapping[str, Sequence[tuple[float, float]]]  # name -> [(x, y), ...]

WIDTH, HEIGHT = 4.6, 2.9  # inches: two charts side by side in the report's 1100 px column


def _figure(width: float = WIDTH, height: float = HEIGHT) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finite(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points with both coordinates finite: undefined values (None, NaN) are gaps, not zeros."""
    return [
        (float(x), float(y))
        for x, y in points
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, color="#eeeeee", linewidth=0.8)
    ax.set_axisbelow(True)


def _plain_log_labels(axis: Axis) -> None:
    """Decades labelled in plain numbers (0.001; mathtext labels like 10⁻³ cost ~0.5 s of parsing a chart),
    and the minor ticks too on an axis spanning under ~1.3 decades, which shows at most one decade tick."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    def minor(v: float, _pos: int) -> str:
        lo, hi = sorted(axis.get_view_interval())
        return f"{v:.2g}" if lo > 0 and hi / lo < 20 else ""

    axis.set_major_locator(LogLocator(numticks=6))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_locator(LogLocator(subs="auto", numticks=6))
    axis.set_minor_formatter(FuncFormatter(minor))


def line_chart(
    series: Series,
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    logx: bool = False,
    logy: bool = False,
    from_zero: bool = False,
    integer_x: bool = False,
    markers: bool = True,
    width: float = WIDTH,
) -> Figure:
    """One line per series, in the given order (ax.lines[i] is series i), non-finite points dropped."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure(width)
    for name, points in series.items():
        pts = _finite(points)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, marker="o" if markers else None, markersize=3, linewidth=1.6, label=name)
    if logx:
        ax.set_xscale("log")
        _plain_log_labels(ax.xaxis)
    if logy:
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis)
    if from_zero and not logy:
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _style(ax, title, xlabel, ylabel)
    if series:
        ax.legend(fontsize=7, frameon=False)
    return fig


def by_layer(series: Series, title: str, ylabel: str, *, from_zero: bool = True) -> Figure:
    """A figure per block (activation norms, drift, power-law α by role): x is the layer index."""
    return line_chart(series, title, "layer", ylabel, integer_x=True, from_zero=from_zero)


def eps_curves(series: Series, title: str, xlabel: str = "ε (box units)") -> Figure:
    """Accuracy against ε, one line per variant; the y axis is the full [0, 1] of an accuracy."""
    fig = line_chart(series, title, xlabel, "accuracy")
    fig.axes[0].set_ylim(-0.02, 1.02)
    return fig


def feature_density(hists: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> Figure:
    """SAE feature-density histograms, per hook (bin edges in log10 firing frequency, counts): the
    number of features at each firing frequency, on a log frequency axis. Point i sits at the bin's
    geometric centre 10^((e_i + e_(i+1)) / 2)."""
    series = {
        hook: [(10 ** ((edges[i] + edges[i + 1]) / 2), float(c)) for i, c in enumerate(counts)]
        for hook, (edges, counts) in hists.items()
    }
    return line_chart(
        series, "feature density (held-out tokens)", "firing frequency", "features", logx=True, width=WIDTH * 1.2
    )


def spectral_density(
    log10_lambda: Sequence[float],
    log10_density: Sequence[float],
    title: str,
    alpha: float | None = None,
    xmin: float | None = None,
) -> Figure:
    """The empirical spectral density of WᵀW on log-log axes (line 0), and, where the fit is defined,
    the power law p(λ) ∝ λ^−α from xmin (line 1), anchored at the ESD bin nearest xmin."""
    lam = [10**x for x in log10_lambda]
    dens = [10**y for y in log10_density]
    series = {"ESD": list(zip(lam, dens, strict=True))}
    if alpha is not None and xmin is not None and math.isfinite(alpha) and xmin > 0 and lam:
        x0 = math.log10(xmin)
        y0 = log10_density[min(range(len(lam)), key=lambda i: abs(log10_lambda[i] - x0))]
        series["α fit"] = [(10**x, 10 ** (y0 - alpha * (x - x0))) for x in log10_lambda if x >= x0]
    fig = line_chart(series, title, "λ (eigenvalue of WᵀW)", "density", logx=True, logy=True, markers=False)
    if "α fit" in series:
        fit_line = fig.axes[0].lines[1]
        fit_line.set_linestyle("--")
        fit_line.set_label(f"α fit (α = {alpha:.2f})")
        fig.axes[0].legend(fontsize=7, frameon=False)
    return fig


def cka_heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], title: str = "linear CKA") -> Figure:
    """A similarity matrix in [0, 1] (linear CKA between layers), each cell annotated with its value."""
    import numpy as np

    m = np.asarray(matrix, dtype=np.float64)
    n = len(labels)
    side = min(9.0, 2.4 + 0.42 * n)
    fig, ax = _figure(side + 1.2, side)
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="Blues", interpolation="nearest")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    if n <= 16:  # values readable in the cells
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if m[i, j] > 0.6 else "#222222")  # fmt: skip
    ax.set_title(title, fontsize=10, loc="left")
    fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    return fig


def value_grid(
    matrix: Sequence[Sequence[float]],
    title: str,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    colorbar_label: str = "",
) -> Figure:
    """Any matrix of values shaded from its minimum to its maximum (Fisher diagonal maps, log10 Fisher
    trace by block × tensor); NaN cells (no value) are left blank."""
    import numpy as np

    m = np.ma.masked_invalid(np.asarray(matrix, dtype=np.float64))
    rows, cols = m.shape
    labelled = row_labels is not None or col_labels is not None
    width = min(9.0, 2.6 + (0.32 if labelled else 0.09) * cols)
    height = min(9.0, 1.6 + (0.28 if labelled else 0.09) * rows)
    fig, ax = _figure(width, height)
    im = ax.imshow(m, cmap="Purples", interpolation="nearest", aspect="auto")
    if row_labels is not None:
        ax.set_yticks(range(rows), row_labels, fontsize=7)
    else:  # a pooled matrix: cell indices mean nothing to a reader
        ax.set_yticks([])
        ax.set_ylabel("outputs", fontsize=8)
    if col_labels is not None:
        ax.set_xticks(range(cols), col_labels, rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_xlabel("inputs", fontsize=8)
    ax.set_title(title, fontsize=9, loc="left")
    bar = fig.colorbar(im, ax=ax, shrink=0.85)
    bar.set_label(colorbar_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


_ID = re.compile(r'\sid="([^"]+)"')
_REF = re.compile(r'#([^")\s]+)')


def to_svg(fig: Figure) -> str:
    """The figure as inline SVG for an HTML page: text kept as text (small, searchable), no XML prologue,
    no metadata, and only the ids something in it refers to (clip paths, markers), so many charts on one
    page repeat no id. Raster parts (heatmaps) are embedded as data URIs: nothing is fetched."""
    import matplotlib as mpl

    buf = io.StringIO()
    with mpl.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    used = set(_REF.findall(svg))
    svg = _ID.sub(lambda m: m.group(0) if m.group(1) in used else "", svg)
    return svg.replace("<svg ", '<svg class="chart" role="img" ', 1)
