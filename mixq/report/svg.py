"""Inline SVG plots for the HTML report: line/scatter plots, heat maps and horizontal bars.

Every function returns an ``<svg>`` element as a string. Marks that carry information have an SVG
``<title>`` (the browser's own tooltip) and a ``data-tip`` attribute (the page's tooltip); points of a
plot may carry ``data-key`` so that the page can react to a click. No external resources are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

VIRIDIS = ((68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
           (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37))
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def colour(t: float) -> str:
    """Viridis at ``t`` in [0, 1] (clipped) as ``#rrggbb``."""
    t = min(max(float(t), 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    r, g, b = (round(a + (c - a) * f) for a, c in zip(VIRIDIS[i], VIRIDIS[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def _dark(hex_colour: str) -> bool:
    r, g, b = (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b < 0.5


def fmt(v: float | None, digits: int = 4) -> str:
    """A number for a label: ``-`` for None/NaN, else ``digits`` significant digits."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}g}"


def tick_text(t: float, ticks: Sequence[float]) -> str:
    """The label of tick ``t`` with just enough digits to tell it from its neighbours in ``ticks``."""
    gaps = [abs(b - a) for a, b in zip(ticks, ticks[1:]) if b != a]
    if not gaps or t == 0:
        return f"{t:.4g}"
    digits = math.floor(math.log10(abs(t))) - math.floor(math.log10(min(gaps))) + 1
    return f"{t:.{max(digits, 1)}g}"


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About ``count`` round tick values covering [lo, hi]."""
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


@dataclass
class Point:
    """A plotted point: coordinates, tooltip text, and an optional key the page reacts to on click."""

    x: float
    y: float
    tip: str = ""
    key: str | None = None
    label: str | None = None  # text drawn next to the point


@dataclass
class Series:
    """Points drawn with one colour; ``line`` joins them in x order, ``marker`` is circle/square/diamond."""

    name: str
    points: list[Point]
    color: str = PALETTE[0]
    line: bool = True
    marker: str = "circle"
    dashed: bool = False


@dataclass
class Axes:
    """Plot frame: pixel size, axis titles, log or linear y, and optional horizontal reference lines."""

    x_label: str
    y_label: str
    log_y: bool = False
    width: int = 980
    height: int = 420
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label)


def _marker(kind: str, x: float, y: float, color: str, attrs: str = "", inner: str = "") -> str:
    """One marker element (circle, square or diamond) centred at pixel (x, y)."""
    if kind == "square":
        head, tag = f'<rect x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9" fill="{color}"', "rect"
    elif kind == "diamond":
        head, tag = (f'<polygon points="{x:.1f},{y - 6:.1f} {x + 6:.1f},{y:.1f} {x:.1f},{y + 6:.1f} '
                     f'{x - 6:.1f},{y:.1f}" fill="{color}"', "polygon")
    else:
        head, tag = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}"', "circle"
    return f"{head}{attrs}>{inner}</{tag}>"


def line_plot(series: Sequence[Series], axes: Axes, plot_id: str) -> str:
    """An x/y plot of ``series`` with ticks, grid, legend and hoverable points.

    y is drawn on a log10 scale when ``axes.log_y`` and every y is positive. Points with a non-finite
    coordinate are left out. Returns ``<svg class="plot" id=plot_id ...>``.
    """
    W, H = axes.width, axes.height
    left, right, top, bottom = 70, 250, 20, 50  # the legend sits right of the frame
    pts = [p for s in series for p in s.points if math.isfinite(p.x) and math.isfinite(p.y)]
    ys = [p.y for p in pts] + [y for y, _ in axes.hlines]
    log = axes.log_y and bool(ys) and min(ys) > 0
    tf = (lambda v: math.log10(v)) if log else (lambda v: v)
    xs = [p.x for p in pts] or [0.0, 1.0]
    ty = [tf(y) for y in ys] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ty), max(ty)
    xpad = (x1 - x0) * 0.06 or 0.5
    ypad = (y1 - y0) * 0.08 or (0.05 if log else max(abs(y0) * 0.1, 0.5))
    x0, x1, y0, y1 = x0 - xpad, x1 + xpad, y0 - ypad, y1 + ypad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (W - left - right)

    def py(y: float) -> float:
        return H - bottom - (tf(y) - y0) / (y1 - y0) * (H - top - bottom)

    out = [f'<svg class="plot" id="{escape(plot_id)}" xmlns="http://www.w3.org/2000/svg" width="{W}" '
           f'height="{H}" viewBox="0 0 {W} {H}" role="img">',
           f'<rect x="{left}" y="{top}" width="{W - left - right}" height="{H - top - bottom}" '
           f'fill="#fff" stroke="#999"/>']
    x_ticks = [t for t in nice_ticks(x0, x1) if x0 <= t <= x1]
    for t in x_ticks:
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{H - bottom}" class="grid"/>'
                   f'<text x="{px(t):.1f}" y="{H - bottom + 16}" text-anchor="middle">{tick_text(t, x_ticks)}</text>')
    if log and y1 - y0 < 1.2:  # less than about a decade: linear-looking ticks on the log scale
        y_ticks = [t for t in nice_ticks(10 ** y0, 10 ** y1) if t > 0]
    elif log:
        y_ticks = [10.0 ** e for e in range(math.floor(y0), math.ceil(y1) + 1)]
    else:
        y_ticks = nice_ticks(y0, y1)
    y_ticks = [t for t in y_ticks if y0 <= tf(t) <= y1]
    for t in y_ticks:
        out.append(f'<line x1="{left}" x2="{W - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{tick_text(t, y_ticks)}</text>')
    out.append(f'<text x="{(left + W - right) / 2:.0f}" y="{H - 10}" text-anchor="middle" class="axis">'
               f'{escape(axes.x_label)}</text>')
    out.append(f'<text transform="translate(16 {(top + H - bottom) / 2:.0f}) rotate(-90)" text-anchor="middle" '
               f'class="axis">{escape(axes.y_label)}{" (log scale)" if log else ""}</text>')
    for y, label in axes.hlines:
        out.append(f'<line x1="{left}" x2="{W - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#666" '
                   f'stroke-dasharray="6 4"><title>{escape(label)}</title></line>'
                   f'<text x="{W - right - 4}" y="{py(y) - 4:.1f}" text-anchor="end" class="note">'
                   f'{escape(label)}</text>')
    for s in series:
        shown = sorted((p for p in s.points if math.isfinite(p.x) and math.isfinite(p.y)), key=lambda p: p.x)
        if s.line and len(shown) > 1:
            path = " ".join(f"{px(p.x):.1f},{py(p.y):.1f}" for p in shown)
            dash = ' stroke-dasharray="5 3"' if s.dashed else ""
            out.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="1.8"{dash}/>')
        for p in shown:
            key = f' data-key="{escape(p.key)}"' if p.key is not None else ""
            tip = escape(p.tip or f"{s.name}: ({p.x:.4g}, {p.y:.4g})")
            out.append(_marker(s.marker, px(p.x), py(p.y), s.color, f' class="pt" data-tip="{tip}"{key}',
                               f"<title>{tip}</title>"))
            if p.label:
                out.append(f'<text x="{px(p.x) + 7:.1f}" y="{py(p.y) - 7:.1f}" class="note">{escape(p.label)}</text>')
    named = [s for s in series if s.name and any(math.isfinite(p.y) for p in s.points)]
    for i, s in enumerate(named):
        y = top + 14 + 16 * i
        out.append(_marker(s.marker, W - right + 16, y - 4, s.color) +
                   f'<text x="{W - right + 28}" y="{y}" class="legend">{escape(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)


def heatmap(rows: Sequence[str], cols: Sequence[str], values: Sequence[Sequence[float | None]],
            texts: Sequence[Sequence[str]], tips: Sequence[Sequence[str]], plot_id: str, *,
            value_label: str, lo: float | None = None, hi: float | None = None, log: bool = False) -> str:
    """A grid of coloured cells: ``values[i][j]`` (None: empty cell) for row ``rows[i]`` and column
    ``cols[j]``, with ``texts[i][j]`` written in the cell and ``tips[i][j]`` on hover.

    The colour runs over [lo, hi] (default: the finite values' range), of log10 values with ``log``
    (non-positive values then take the lowest colour). Returns ``<svg class="heat" id=plot_id ...>``.
    """
    tf = (lambda v: math.log10(v) if v > 0 else -math.inf) if log else (lambda v: v)
    finite = [tf(v) for row in values for v in row if v is not None and math.isfinite(tf(v))]
    vlo = tf(lo) if lo is not None else (min(finite) if finite else 0.0)
    vhi = tf(hi) if hi is not None else (max(finite) if finite else 1.0)
    if vhi - vlo < 1e-12:
        vlo, vhi = vlo - 0.5, vhi + 0.5
    cell_w = max(52, min(110, 8 * max((len(t) for row in texts for t in row), default=4) + 14))
    cell_h = 22
    label_w = 8 * max((len(r) for r in rows), default=4) + 16
    head_h = 8 * max((len(c) for c in cols), default=4) * 0.72 + 20
    W = int(label_w + cell_w * len(cols) + 110)
    H = int(head_h + cell_h * len(rows) + 20)
    out = [f'<svg class="heat" id="{escape(plot_id)}" xmlns="http://www.w3.org/2000/svg" width="{W}" '
           f'height="{H}" viewBox="0 0 {W} {H}" role="img">']
    for j, c in enumerate(cols):
        x = label_w + cell_w * (j + 0.5)
        out.append(f'<text transform="translate({x:.1f} {head_h - 6:.1f}) rotate(-35)" class="legend">'
                   f'{escape(c)}</text>')
    for i, r in enumerate(rows):
        y = head_h + cell_h * i
        out.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" class="legend">{escape(r)}</text>')
        for j in range(len(cols)):
            v = values[i][j]
            if v is None:
                continue
            t = tf(v)
            fill = colour((t - vlo) / (vhi - vlo) if math.isfinite(t) else 0.0)
            tip = escape(tips[i][j])
            x = label_w + cell_w * j
            out.append(f'<rect x="{x:.1f}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" fill="{fill}" '
                       f'class="cell" data-tip="{tip}"><title>{tip}</title></rect>'
                       f'<text x="{x + cell_w / 2:.1f}" y="{y + 15}" text-anchor="middle" class="celltext" '
                       f'style="fill:{"#fff" if _dark(fill) else "#000"}">{escape(texts[i][j])}</text>')
    bx, by, bh = W - 90, head_h, max(cell_h * len(rows), 60)
    for k in range(20):
        out.append(f'<rect x="{bx}" y="{by + bh * (19 - k) / 20:.1f}" width="14" height="{bh / 20 + 0.5:.1f}" '
                   f'fill="{colour(k / 19)}"/>')
    top_v, bottom_v = (10 ** vhi, 10 ** vlo) if log else (vhi, vlo)
    out.append(f'<text x="{bx + 18}" y="{by + 10}" class="legend">{top_v:.3g}</text>'
               f'<text x="{bx + 18}" y="{by + bh}" class="legend">{bottom_v:.3g}</text>'
               f'<text x="{bx}" y="{by - 6}" class="legend">{escape(value_label)}</text></svg>')
    return "".join(out)


def bars(labels: Sequence[str], values: Sequence[float], tips: Sequence[str], plot_id: str, *,
         value_label: str, log: bool = False, color: str = PALETTE[0]) -> str:
    """Horizontal bars, one per label, length ``values[i]`` (log10 scale with ``log``; values <= 0 get no
    bar). Returns ``<svg class="bars" id=plot_id ...>``."""
    label_w = 8 * max((len(s) for s in labels), default=4) + 16
    W, bar_w, row_h = label_w + 520, 440, 18
    H = row_h * len(labels) + 40
    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if log and positive:
        lo, hi = math.log10(min(positive)) - 0.3, math.log10(max(positive))
        length = (lambda v: (math.log10(v) - lo) / ((hi - lo) or 1.0) if v > 0 else 0.0)
    else:
        top = max((abs(v) for v in finite), default=1.0) or 1.0
        length = (lambda v: abs(v) / top)
    out = [f'<svg class="bars" id="{escape(plot_id)}" xmlns="http://www.w3.org/2000/svg" width="{W}" '
           f'height="{H}" viewBox="0 0 {W} {H}" role="img">',
           f'<text x="{label_w}" y="14" class="legend">{escape(value_label)}{" (log scale)" if log else ""}</text>']
    for i, (label, v, tip) in enumerate(zip(labels, values, tips)):
        y = 24 + row_h * i
        out.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end" class="legend">{escape(label)}</text>')
        if v is None or not math.isfinite(v):
            continue
        w = max(length(v) * bar_w, 1.0)
        out.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{row_h - 4}" fill="{color}" '
                   f'class="cell" data-tip="{escape(tip)}"><title>{escape(tip)}</title></rect>'
                   f'<text x="{label_w + w + 4:.1f}" y="{y + 12}" class="note">{fmt(v)}</text>')
    out.append("</svg>")
    return "".join(out)
