"""The study plot: SQNR (dB) against bits per value, one labelled point per spec.

Uses matplotlib's object API (``Figure`` + Agg canvas), so no global backend or pyplot state is
touched. Families (from the element format) get their own marker and colour. A spec whose median
layer is exact (infinite SQNR) is drawn on a dotted line at the top; a spec flagged as "already on
this grid" is drawn hollow. Where several specs crowd together (typically the 4-bit formats), an
inset magnifies them, so that every label stays next to its point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mixq.eval.study import SpecSummary, StudyResult

FAMILY_STYLE = {
    "INT": {"marker": "o", "color": "#1f77b4", "label": "INT elements"},
    "FP": {"marker": "^", "color": "#d62728", "label": "FP elements"},
    "grid": {"marker": "s", "color": "#2ca02c", "label": "lookup grid (NF4, ...)"},
    "other": {"marker": "D", "color": "#7f7f7f", "label": "other"},
}
Point = tuple[float, float, str]
INSET_BOXES = ((0.04, 0.50, 0.42, 0.46), (0.54, 0.04, 0.42, 0.46), (0.04, 0.04, 0.42, 0.46))


def _draw(ax: Any, summary: list[SpecSummary], top: float) -> list[Point]:
    """Bars (median down to the worst layer) and markers; returns ``(x, y, label)`` per spec."""
    points = []
    for s in sorted(summary, key=lambda s: (s.bits_per_value, s.sqnr_median_db)):
        style = FAMILY_STYLE.get(s.family, FAMILY_STYLE["other"])
        y = s.sqnr_median_db if math.isfinite(s.sqnr_median_db) else top
        lo = s.sqnr_min_db if math.isfinite(s.sqnr_min_db) else top
        ax.plot([s.bits_per_value] * 2, [lo, y], color=style["color"], alpha=0.35, lw=1.5)
        ax.scatter([s.bits_per_value], [y], marker="^" if y == top else style["marker"], s=60, zorder=3,
                   facecolors="white" if s.on_grid else style["color"], edgecolors=style["color"],
                   linewidths=1.5)
        points.append((s.bits_per_value, y, s.spec + (" (on grid)" if s.on_grid else "")))
    return points


def _legend_handles(summary: list[SpecSummary]) -> list[Any]:
    """One legend entry per family present, plus the hollow marker of "on grid" when used."""
    from matplotlib.lines import Line2D

    handles = []
    for fam in dict.fromkeys(s.family for s in summary):
        st = FAMILY_STYLE.get(fam, FAMILY_STYLE["other"])
        handles.append(Line2D([], [], ls="", marker=st["marker"], color=st["color"], label=st["label"], ms=8))
    if any(s.on_grid for s in summary):
        handles.append(Line2D([], [], ls="", marker="o", mfc="white", mec="0.3", ms=8,
                              label="hollow: some layers already on this grid (> 60 dB)"))
    return handles


def _crowd(points: list[Point], xlim: tuple[float, float], ylim: tuple[float, float]) -> list[Point]:
    """The largest group (3 or more) of points within a few marker sizes of one point, else []."""
    def frac(p: Point) -> tuple[float, float]:
        return (p[0] - xlim[0]) / (xlim[1] - xlim[0]), (p[1] - ylim[0]) / (ylim[1] - ylim[0])

    best: list[Point] = []
    for p in points:
        px, py = frac(p)
        near = [q for q in points if abs(frac(q)[0] - px) <= 0.05 and abs(frac(q)[1] - py) <= 0.04]
        if len(near) > len(best):
            best = near
    return best if len(best) >= 3 else []


def _offsets() -> list[tuple[float, float]]:
    """Candidate label offsets in points, nearest first: right, left, above, below, then diagonals."""
    out = []
    for r in (8, 18, 30, 44, 60, 80):
        for ang in (0, 180, 90, 270, 30, 150, 210, 330, 60, 120, 240, 300):
            out.append((r * math.cos(math.radians(ang)), r * 0.8 * math.sin(math.radians(ang))))
    return out


def _crosses(a: tuple[float, float], box: Any, markers: list[Any]) -> bool:
    """Whether the leader line from pixel ``a`` to the centre of ``box`` passes through a marker."""
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    for i in range(1, 20):
        x, y = a[0] + (cx - a[0]) * i / 20, a[1] + (cy - a[1]) * i / 20
        if not box.contains(x, y) and any(m.contains(x, y) for m in markers):
            return True
    return False


def _label_points(ax: Any, points: list[Point], avoid: list[Any]) -> None:
    """Annotate each point, trying offsets until the text (and its leader line) clears every other
    label, marker and ``avoid`` box."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = 7.0  # pixels around a marker
    pixels = [tuple(ax.transData.transform((x, y))) for x, y, _ in points]
    markers = [Bbox.from_extents(px - pad, py - pad, px + pad, py + pad) for px, py in pixels]
    taken = list(avoid) + markers
    for (x, y, text), here, own in zip(points, pixels, markers, strict=True):
        others = [m for m in markers if m is not own]
        for k, (dx, dy) in enumerate(_offsets()):
            kw = {"xytext": (dx, dy), "textcoords": "offset points", "fontsize": 8, "va": "center",
                  "ha": "left" if dx > 1 else "right" if dx < -1 else "center"}
            ann = ax.annotate(text, (x, y), **kw)  # no arrow yet: its extent would cover the marker
            box = ann.get_window_extent(renderer).padded(1.5)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            clear = inside and not any(box.overlaps(t) for t in taken)
            if clear and not (k >= 4 and _crosses(here, box, others)):
                taken.append(box)
                if k >= 4:  # moved away from the point: draw a thin leader line
                    ann.remove()
                    ax.annotate(text, (x, y), arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6}, **kw)
                break
            ann.remove()
        else:  # nowhere free: keep the nearest position
            ax.annotate(text, (x, y), xytext=(8, 0), textcoords="offset points", fontsize=8, va="center")


def plot_study(result: StudyResult, path: Path, title: str | None = None) -> Path:
    """Save the plot of ``result`` as a PNG at ``path``; returns ``path``.

    The y value is the median over layers of the per-layer SQNR (robust to a few layers that are
    exact); a vertical bar reaches down to the worst layer.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = [s for s in result.summary if s.layers > 0]
    finite = [v for s in summary for v in (s.sqnr_median_db, s.sqnr_min_db) if math.isfinite(v)]
    top = (max(finite) if finite else 0.0) + 8.0  # where infinite SQNR (exact) is drawn
    fig = Figure(figsize=(11, 7), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = _draw(ax, summary, top)
    xs = [p[0] for p in points] or [0.0, 1.0]
    exact = any(not math.isfinite(s.sqnr_median_db) for s in summary)
    xlim = (min(xs) - 0.5, max(xs) + 1.2)
    ylim = (min(finite or [0.0]) - 3.0, (top if exact else max(finite or [0.0])) + 3.0)
    ax.set(xlim=xlim, ylim=ylim, title=title or _default_title(result),
           xlabel="bits per value (element + every scale and zero point)",
           ylabel="SQNR (dB): median over layers, bar down to the worst layer")
    notes = []
    if exact:
        ax.axhline(top, color="0.7", ls=":", lw=1)
        notes.append(ax.text(xlim[0] + 0.05, top + 0.5, "exact (infinite SQNR)", fontsize=8, color="0.4"))
    ax.grid(True, alpha=0.3)
    ax.legend(handles=_legend_handles(summary), loc="lower right", fontsize=9)
    inset, crowd = _inset(ax, summary, points, top, xlim, ylim)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    avoid = [a.get_window_extent(renderer) for a in (ax.get_legend(), *notes)]
    if inset is not None:
        avoid.append(inset.get_tightbbox(renderer))
        _label_points(inset, crowd, [])
    _label_points(ax, [p for p in points if p not in crowd], avoid)  # after the layout: pixels are final
    fig.savefig(path, format="png")
    return path


def _inset(ax: Any, summary: list[SpecSummary], points: list[Point], top: float,
           xlim: tuple[float, float], ylim: tuple[float, float]) -> tuple[Any, list[Point]]:
    """Magnify the most crowded group of points in an inset placed where no point lies."""
    crowd = _crowd(points, xlim, ylim)
    if not crowd:
        return None, []
    x0, x1 = min(p[0] for p in crowd), max(p[0] for p in crowd)
    y0, y1 = min(p[1] for p in crowd), max(p[1] for p in crowd)
    zx = (x0 - 0.15 - (x1 - x0) * 0.3, x1 + 0.15 + (x1 - x0) * 0.9)
    zy = (y0 - 0.6 - (y1 - y0) * 0.3, y1 + 0.6 + (y1 - y0) * 0.3)
    crowd = [p for p in points if zx[0] <= p[0] <= zx[1] and zy[0] <= p[1] <= zy[1]]

    def frac(x: float, y: float) -> tuple[float, float]:
        return (x - xlim[0]) / (xlim[1] - xlim[0]), (y - ylim[0]) / (ylim[1] - ylim[0])

    for bx, by, bw, bh in INSET_BOXES:
        corners = [frac(zx[0], zy[0]), frac(zx[1], zy[1])]
        blocked = [frac(p[0], p[1]) for p in points] + corners
        m = 0.02  # margin around the inset
        if not any(bx - m <= fx <= bx + bw + m and by - m <= fy <= by + bh + m for fx, fy in blocked):
            break
    else:
        return None, []
    inset = ax.inset_axes((bx, by, bw, bh))
    names = {p[2].removesuffix(" (on grid)") for p in crowd}
    _draw(inset, [s for s in summary if s.spec in names], top)
    inset.set(xlim=zx, ylim=zy)
    inset.tick_params(labelsize=7)
    inset.grid(True, alpha=0.3)
    ax.indicate_inset_zoom(inset, edgecolor="0.4")
    return inset, crowd


def _default_title(result: StudyResult) -> str:
    model = result.meta.get("model")
    n = len({r.layer for r in result.layers})
    return "Weight SQNR vs bits per value" + (f": {model}" if model else "") + f" ({n} layers, RTN)"
