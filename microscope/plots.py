"""Inline SVG charts: the report stays one self-contained file with no scripts or network."""

from __future__ import annotations

import html
import math

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2) if start + i * step <= hi + step * 0.01]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 420,
    height: int = 240,
    from_zero: bool = True,
) -> str:
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not pts:
        return ""
    left, right, top, bottom = 56, 12, 40, 40
    slots, x, row = [], float(left), 0
    for name in series:
        w = 26 + 6.5 * len(name)
        if x + w > width - right and x > left:
            x, row = float(left), row + 1
        slots.append((x, row))
        x += w
    top += 13 * row
    height += 13 * row
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    lo = min(0.0, min(ys)) if from_zero else min(ys)
    y0, y1 = lo, max(ys) if max(ys) > lo else lo + 1.0
    yt = _ticks(y0, y1)
    y0, y1 = min(y0, yt[0]), max(y1, yt[-1])

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}" class="chart">',
        f'<text x="{left}" y="16" class="t">{html.escape(title)}</text>',
        f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" class="a">{html.escape(xlabel)}</text>',
        f'<text x="12" y="{height / 2}" text-anchor="middle" class="a" transform="rotate(-90 12 {height / 2})">'
        f"{html.escape(ylabel)}</text>",
    ]
    for t in yt:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="g"/>')
        out.append(f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" class="k">{_fmt(t)}</text>')
    xticks = sorted(set(xs))
    if len(xticks) > 12:  # a continuous axis: round ticks inside the data range
        xticks = [t for t in _ticks(x0, x1, 6) if x0 - 1e-9 <= t <= x1 + 1e-9]
    for x in xticks:
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle" class="k">{_fmt(x)}</text>')
    legend: list[tuple[str, str]] = []
    for i, (name, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        s = [p for p in s if math.isfinite(p[1])]
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(s))
        out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in s:
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"><title>{html.escape(name)} '
                f"layer {_fmt(x)}: {_fmt(y)}</title></circle>"
            )
        legend.append((name, color))
    # Legend below the title, wrapping onto more rows when the names are long; inline style, since the
    # stylesheet's text fill would win over an attribute.
    x, row = left, 0
    for name, color in legend:
        w = 26 + 6.5 * len(name)
        if x + w > width - right and x > left:
            x, row = left, row + 1
        out.append(
            f'<text x="{x:.0f}" y="{30 + 13 * row}" class="k" style="fill:{color}">&#9632; {html.escape(name)}</text>'
        )
        x += w
    out.append("</svg>")
    return "".join(out).replace(f'height="{height}"', f'height="{height + 13 * row}"', 1) if row else "".join(out)


def heatmap(matrix: list[list[float]], labels: list[str], title: str, cell: int = 36) -> str:
    """A square matrix in [0, 1] as coloured cells with their values (CKA)."""
    n = len(labels)
    left, top = 170, 24
    width, height = left + n * cell + 10, top + n * cell + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="chart" role="img" '
        f'aria-label="{html.escape(title)}"><text x="{left}" y="16" class="t">{html.escape(title)}</text>'
    ]
    for i, row in enumerate(matrix):
        y = top + i * cell
        out.append(
            f'<text x="{left - 6}" y="{y + cell / 2 + 4}" text-anchor="end" class="k">{html.escape(labels[i])}</text>'
        )
        for j, v in enumerate(row):
            shade = int(255 - 200 * max(0.0, min(1.0, v)))
            out.append(
                f'<rect x="{left + j * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                f'fill="rgb({shade},{shade},255)"><title>{html.escape(labels[i])} vs {html.escape(labels[j])}: '
                f"{v:.4f}</title></rect>"
            )
            out.append(
                f'<text x="{left + j * cell + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" class="k">'
                f"{v:.2f}</text>"
            )
    out.append("</svg>")
    return "".join(out)


def value_grid(
    matrix: list[list[float]],
    title: str,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    cell: int = 8,
    legend: str = "",
) -> str:
    """Any matrix of finite values (NaN: blank) shaded from its min (light) to its max (dark): Fisher
    maps and block × tensor tables. Labels are optional; each cell's value is in its tooltip."""
    vals = [v for row in matrix for v in row if v == v]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    span = (hi - lo) or 1.0
    left = 170 if row_labels else 10
    top = 24 + (90 if col_labels else 0)
    n_rows, n_cols = len(matrix), max((len(r) for r in matrix), default=0)
    width, height = max(left + n_cols * cell + 10, 260), top + n_rows * cell + 26
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="chart" role="img" '
        f'aria-label="{html.escape(title)}"><text x="10" y="16" class="t">{html.escape(title)}</text>'
    ]
    for j, lab in enumerate(col_labels or []):
        x = left + j * cell + cell / 2
        out.append(
            f'<text x="{x}" y="{top - 4}" transform="rotate(-60 {x} {top - 4})" class="k">{html.escape(lab)}</text>'
        )
    for i, row in enumerate(matrix):
        y = top + i * cell
        if row_labels:
            out.append(
                f'<text x="{left - 6}" y="{y + cell / 2 + 4}" text-anchor="end" class="k">{html.escape(row_labels[i])}</text>'
            )
        for j, v in enumerate(row):
            if v != v:
                continue
            shade = int(250 - 210 * (v - lo) / span)
            out.append(
                f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" fill="rgb({shade},{shade},255)">'
                f"<title>{v:.4g}</title></rect>"
            )
    out.append(
        f'<text x="{left}" y="{height - 8}" class="k">{html.escape(legend)} light {lo:.3g} → dark {hi:.3g}</text></svg>'
    )
    return "".join(out)
