"""Each chart puts exactly the data it was given on its axes, on the scales the figure calls for, and
inlines as SVG that fetches nothing."""

from __future__ import annotations

import re

import numpy as np
import pytest

from microscope import charts

TOL = 1e-12  # the data goes through float conversion only: it must come back unchanged


def xy(fig, i: int) -> np.ndarray:
    return fig.axes[0].lines[i].get_xydata()


def test_line_chart_draws_each_series_as_given_and_drops_undefined_points() -> None:
    series = {"a": [(0, 1.0), (1, 2.5), (2, -1.0)], "b": [(0, 3.0), (1, float("nan")), (2, None), (3, 4.0)]}
    fig = charts.line_chart(series, "t", "x", "y")
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and [ln.get_label() for ln in ax.lines] == ["a", "b"]
    np.testing.assert_allclose(xy(fig, 0), [[0, 1.0], [1, 2.5], [2, -1.0]], atol=TOL)
    np.testing.assert_allclose(xy(fig, 1), [[0, 3.0], [3, 4.0]], atol=TOL)  # NaN and None are gaps, not zeros
    assert ax.get_title(loc="left") == "t" and ax.get_xlabel() == "x" and ax.get_ylabel() == "y"
    assert ax.get_xscale() == ax.get_yscale() == "linear"


def test_by_layer_starts_at_zero_and_has_integer_ticks() -> None:
    fig = charts.by_layer({"resid": [(0, 2.0), (1, 3.0), (2, 5.0)]}, "mean ‖x‖ by layer", "mean ‖x‖")
    ax = fig.axes[0]
    np.testing.assert_allclose(xy(fig, 0), [[0, 2.0], [1, 3.0], [2, 5.0]], atol=TOL)
    assert ax.get_ylim()[0] <= 0 and ax.get_xlabel() == "layer"
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_eps_curves_span_the_whole_accuracy_range() -> None:
    curves = {"fp": [(0.0, 0.9), (0.1, 0.5), (0.3, 0.1)], "int8": [(0.0, 0.8), (0.1, 0.4), (0.3, 0.0)]}
    fig = charts.eps_curves(curves, "PGD (Linf): accuracy vs ε")
    for i, pts in enumerate(curves.values()):
        np.testing.assert_allclose(xy(fig, i), pts, atol=TOL)
    lo, hi = fig.axes[0].get_ylim()
    assert lo <= 0 and hi >= 1 and fig.axes[0].get_ylabel() == "accuracy"


def test_feature_density_puts_counts_at_bin_centres_on_a_log_axis() -> None:
    edges = [-7.0, -6.0, -5.0, -4.0]
    fig = charts.feature_density({"blocks.1.hook_resid_post": (edges, [3, 0, 7])})
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"
    centres = 10 ** ((np.array(edges[:-1]) + np.array(edges[1:])) / 2)
    np.testing.assert_allclose(xy(fig, 0), np.c_[centres, [3, 0, 7]], rtol=1e-12)


def test_spectral_density_is_log_log_with_the_fitted_power_law() -> None:
    log_lam = [-1.0, -0.5, 0.0, 0.5, 1.0]
    log_dens = [0.5, 0.2, -0.4, -1.3, -2.2]
    alpha, xmin = 2.0, 10**-0.1  # the ESD bin nearest xmin is log λ = 0.0
    fig = charts.spectral_density(log_lam, log_dens, "h.0.mlp.c_fc.weight", alpha=alpha, xmin=xmin)
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    np.testing.assert_allclose(xy(fig, 0), 10 ** np.c_[log_lam, log_dens], rtol=1e-12)
    fit = np.log10(xy(fig, 1))
    np.testing.assert_allclose(fit[:, 0], [0.0, 0.5, 1.0], atol=1e-12)  # from xmin on
    # slope −α through (xmin, the density of the bin nearest xmin)
    np.testing.assert_allclose(fit[:, 1], -0.4 - alpha * (fit[:, 0] - np.log10(xmin)), atol=1e-12)
    undefined = charts.spectral_density(log_lam, log_dens, "no fit", alpha=None, xmin=None)
    assert len(undefined.axes[0].lines) == 1  # no fit line when α is undefined


def test_cka_heatmap_shows_the_matrix_on_a_fixed_unit_scale() -> None:
    m = [[1.0, 0.4, 0.1], [0.4, 1.0, 0.7], [0.1, 0.7, 1.0]]
    fig = charts.cka_heatmap(m, ["b0", "b1", "b2"])
    im = fig.axes[0].images[0]
    np.testing.assert_allclose(im.get_array(), m, atol=TOL)
    assert im.get_clim() == (0.0, 1.0)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["b0", "b1", "b2"]
    assert {t.get_text() for t in fig.axes[0].texts} == {"1.00", "0.40", "0.10", "0.70"}


def test_value_grid_masks_missing_cells() -> None:
    grid = [[1.0, float("nan")], [-2.0, 3.5], [0.0, 1.5]]
    fig = charts.value_grid(
        grid, "log10 Fisher trace", row_labels=["block 0", "block 1", "block 2"], col_labels=["a", "b"]
    )
    arr = fig.axes[0].images[0].get_array()
    assert arr.mask.tolist() == [[False, True], [False, False], [False, False]]
    np.testing.assert_allclose(arr.filled(np.nan), grid, atol=TOL)


@pytest.mark.parametrize("make", ["line", "heatmap"])
def test_svg_is_inline_and_fetches_nothing(make: str) -> None:
    fig = (
        charts.line_chart({"<a&b>": [(0, 1.0), (1, 2.0)]}, "title <x>", "x", "y")
        if make == "line"
        else charts.cka_heatmap([[1.0, 0.5], [0.5, 1.0]], ["a", "b"])
    )
    svg = charts.to_svg(fig)
    assert svg.startswith('<svg class="chart"') and svg.rstrip().endswith("</svg>")
    assert "<?xml" not in svg and "DOCTYPE" not in svg and "<metadata" not in svg
    # Namespaces are names, not resources; images are data URIs.
    assert set(re.findall(r"https?://[^\s\"'<>]+", svg)) <= {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }
    assert not re.search(r'href="(?!#|data:)', svg)
    ids = re.findall(r'\sid="([^"]+)"', svg)
    assert all(f"#{i}" in svg for i in ids)  # only ids something refers to: many charts, no repeated ids
    if make == "line":
        assert "title &lt;x&gt;" in svg and "&lt;a&amp;b&gt;" in svg  # text kept as (escaped) text
