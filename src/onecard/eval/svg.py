"""Tiny inline-SVG charts for the HTML report: line charts and horizontal bars, no JavaScript, no network.

Written here rather than with matplotlib (not a dependency, and its SVG embeds fonts and ids per figure)
or a JS library (the report must open offline from a single file, and a CDN script would break that).
Each chart is ``<svg class="chart" data-chart=NAME>``; a line chart has one ``<rect class="plot-area">`` and one
``<path class="series" data-series=LABEL>`` per series, so tests can find the plots in the rendered DOM.

Layout, top to bottom: title, legend row, plot area, tick labels, axis label. The axes always cover every point
(``nice_ticks`` extends to the data's maximum), so no line can leave the plot area and reach the title or legend.
Text widths are estimated (``text_width_px``) to place legend entries and size the bar chart's label column;
tests/test_report.py measures the real boxes in headless Chromium.
"""

from __future__ import annotations

import math
from html import escape

COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c"]
WIDTH, HEIGHT = 460, 250
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 64, 20, 52, 42
TITLE_Y, LEGEND_Y = 18, 38
TICK_PX = 11  # font size of ticks, legend and axis labels (report CSS)
BAR_WIDTH = 640  # bar charts sit alone on their row
MAX_POINTS_DRAWN = 40  # above this many points a series is drawn as a line only


def text_width_px(text: str, font_px: float = TICK_PX) -> float:
    """A generous estimate of rendered width: 0.62 em per character (system-ui digits and letters are narrower)."""
    return 0.62 * font_px * len(text)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) whose first is <= lo and whose last is >= hi."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    first -= first * step > lo  # lo / step rounds: the product decides, as the plot computes it
    last += last * step < hi
    return [i * step for i in range(first, last + 1)]


def fmt_number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-2:
        return f"{value:.2g}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _svg_open(name: str, title: str, height: int, width: int = WIDTH) -> str:
    return (f'<svg class="chart" data-chart="{escape(name)}" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}">'
            f'<text x="8" y="{TITLE_Y}" class="title">{escape(title)}</text>')


def _legend(labels: list[str]) -> list[str]:
    """One row under the title, entries placed by their estimated widths (never overlapping the plot area)."""
    parts, x = [], float(PAD_LEFT)
    for i, label in enumerate(labels):
        color = COLORS[i % len(COLORS)]
        parts.append(f'<g class="legend-entry"><rect x="{x:.1f}" y="{LEGEND_Y - 5}" width="14" height="3" fill="{color}"/>'
                     f'<text class="legend" x="{x + 18:.1f}" y="{LEGEND_Y}">{escape(label)}</text></g>')
        x += 18 + text_width_px(label) + 18
    return parts


def line_chart(name: str, title: str, series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
               y_span: tuple[float, float] | None = None) -> str:
    """An SVG line chart; ``series`` maps a label to (x, y) points. Empty series are skipped.

    ``y_span``: a range the y axis covers whatever the data (0-100 for percentages), widened to fit the data.
    """
    series = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return f'<p class="empty" data-chart="{escape(name)}">{escape(title)}: no data</p>'
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    # y: rounded ticks that cover the data; x: exactly the logged steps, ticks at round steps inside them
    y_lo, y_hi = (min(ys), max(ys)) if y_span is None else (min(min(ys), y_span[0]), max(max(ys), y_span[1]))
    y_ticks = nice_ticks(y_lo, y_hi)
    x0, x1, y0, y1 = min(xs), max(xs), y_ticks[0], y_ticks[-1]
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    x_ticks = [t for t in nice_ticks(x0, x1) if x0 <= t <= x1] or [x0, x1]
    plot_w, plot_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - PAD_TOP - PAD_BOTTOM

    def sx(x: float) -> float:
        return PAD_LEFT + (x - x0) / ((x1 - x0) or 1) * plot_w

    def sy(y: float) -> float:
        return PAD_TOP + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    parts = [_svg_open(name, title, HEIGHT), *_legend(list(series)),
             f'<rect class="plot-area" x="{PAD_LEFT}" y="{PAD_TOP}" width="{plot_w}" height="{plot_h}"/>']
    for t in y_ticks:
        parts.append(f'<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>'
                     f'<text class="tick" x="{PAD_LEFT - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{fmt_number(t)}</text>')
    for t in x_ticks:
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{HEIGHT - PAD_BOTTOM + 16}" text-anchor="middle">{fmt_number(t)}</text>')
    parts.append(f'<text class="axis" x="{PAD_LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text class="axis" transform="translate(16 {PAD_TOP + plot_h / 2}) rotate(-90)" '
                 f'text-anchor="middle">{escape(y_label)}</text>')
    for i, (label, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        d = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(pts))
        parts.append(f'<path class="series" data-series="{escape(label)}" d="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        if len(pts) <= MAX_POINTS_DRAWN or len(pts) == 1:
            parts.extend(f'<circle class="point" data-series="{escape(label)}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" '
                         f'r="2.5" fill="{color}"/>' for x, y in pts)
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(name: str, title: str, bars: list[tuple[str, float, str]], unit: str,
              notes: list[str] | None = None) -> str:
    """Horizontal bars: (label, value, kind) where kind is a CSS class (component / planned / measured);
    ``notes``: text after each bar's value (e.g. its share).

    The label column is as wide as the longest label (estimated), so no label is cut at the left edge.
    """
    bars = [b for b in bars if b[1] is not None and math.isfinite(b[1])]
    if not bars:
        return f'<p class="empty" data-chart="{escape(name)}">{escape(title)}: no data</p>'
    top = max(v for _, v, _ in bars) or 1.0
    row_h = 26
    label_w = 8 + max(text_width_px(label) for label, _, _ in bars) + 10
    values = [f"{fmt_number(v)} {unit}" + (f" {n}" if n else "") for (_, v, _), n in zip(bars, notes or [""] * len(bars))]
    value_w = max(text_width_px(v) for v in values) + 12
    bar_w = max(BAR_WIDTH - label_w - value_w - 8, 80)
    width = round(label_w + bar_w + value_w + 8)
    height = 32 + row_h * len(bars) + 6
    parts = [_svg_open(name, title, height, width)]
    for i, ((label, value, kind), value_text) in enumerate(zip(bars, values)):
        y = 32 + i * row_h
        w = bar_w * value / top
        parts.append(f'<text class="tick" x="{label_w - 10:.1f}" y="{y + 13}" text-anchor="end">{escape(label)}</text>'
                     f'<path class="series bar {escape(kind)}" data-series="{escape(label)}" '
                     f'd="M{label_w:.1f},{y + 2} h{w:.1f} v16 h{-w:.1f} Z"/>'
                     f'<text class="tick value" x="{label_w + w + 6:.1f}" y="{y + 13}">{escape(value_text)}</text>')
    parts.append("</svg>")
    return "".join(parts)
