"""Tiny inline-SVG charts for the HTML report: line charts and horizontal bars, no JavaScript, no network.

Written here rather than with matplotlib (not a dependency, and its SVG embeds fonts and ids per figure)
or a JS library (the report must open offline from a single file, and a CDN script would break that).
Each chart is ``<svg class="chart" data-chart=NAME>`` with one ``<path class="series" data-series=LABEL>``
per series, so tests can find the plots in the rendered DOM.
"""

from __future__ import annotations

import math
from html import escape

COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c"]
WIDTH, HEIGHT = 640, 260
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 64, 16, 28, 40


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 5 x 10^k steps)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, value = [], start
    while value <= hi + step * 0.5:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-2:
        return f"{value:.2g}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def line_chart(name: str, title: str, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str) -> str:
    """An SVG line chart; ``series`` maps a label to (x, y) points. Empty series are skipped."""
    series = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return f'<p class="empty" data-chart="{escape(name)}">{escape(title)}: no data</p>'
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1 = x_ticks[0], x_ticks[-1]
    y0, y1 = y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - PAD_TOP - PAD_BOTTOM

    def sx(x: float) -> float:
        return PAD_LEFT + (x - x0) / ((x1 - x0) or 1) * plot_w

    def sy(y: float) -> float:
        return PAD_TOP + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    parts = [f'<svg class="chart" data-chart="{escape(name)}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
             f'height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}">',
             f'<text x="{PAD_LEFT}" y="16" class="title">{escape(title)}</text>']
    for t in y_ticks:
        parts.append(f'<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
                     f'<text class="tick" x="{PAD_LEFT - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in x_ticks:
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{HEIGHT - PAD_BOTTOM + 16}" text-anchor="middle">{_fmt(t)}</text>')
    parts.append(f'<text class="axis" x="{PAD_LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text class="axis" transform="translate(14 {PAD_TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>')
    for i, (label, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        d = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(pts))
        parts.append(f'<path class="series" data-series="{escape(label)}" d="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        if len(pts) <= 40:
            parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts)
        lx = WIDTH - PAD_RIGHT - 130 * (len(series) - i)
        parts.append(f'<rect x="{lx}" y="10" width="10" height="3" fill="{color}"/>'
                     f'<text class="legend" x="{lx + 14}" y="15">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(name: str, title: str, bars: list[tuple[str, float, str]], unit: str) -> str:
    """Horizontal bars: (label, value, kind) where kind is a CSS class (planned / measured)."""
    bars = [b for b in bars if b[1] is not None and math.isfinite(b[1])]
    if not bars:
        return f'<p class="empty" data-chart="{escape(name)}">{escape(title)}: no data</p>'
    top = max(v for _, v, _ in bars) or 1.0
    row_h, label_w = 30, 180
    height = PAD_TOP + row_h * len(bars) + 10
    parts = [f'<svg class="chart" data-chart="{escape(name)}" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
             f'height="{height}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}">',
             f'<text x="8" y="16" class="title">{escape(title)}</text>']
    for i, (label, value, kind) in enumerate(bars):
        y = PAD_TOP + i * row_h
        w = (WIDTH - label_w - 110) * value / top
        parts.append(f'<text class="tick" x="{label_w - 8}" y="{y + 17}" text-anchor="end">{escape(label)}</text>'
                     f'<path class="series bar {escape(kind)}" data-series="{escape(label)}" '
                     f'd="M{label_w},{y + 4} h{w:.1f} v18 h{-w:.1f} Z"/>'
                     f'<text class="tick" x="{label_w + w + 6:.1f}" y="{y + 17}">{_fmt(value)} {escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)
