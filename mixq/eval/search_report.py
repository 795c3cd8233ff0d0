"""Report pieces of ``mixq search`` and ``mixq frontier``: the frontier plot, allocation heat maps, Markdown.

Every function takes plain data (lists of dicts as written to ``search.json`` / ``frontier.json``), so a
report can be redrawn from saved results. Plots use matplotlib's object API (``Figure`` + Agg canvas):
no global backend or pyplot state is touched.

A frontier point is a mapping with ``family`` (``joint`` | ``int`` | ``float`` | ``uniform``), ``label``,
``bits_per_weight`` (over the profiled layers, every scale counted), ``predicted`` (sum of the metric's
scores) and ``measured`` (perplexity, or ``1 - cosine`` for encoders; None when not measured).
An allocation row is a mapping with ``name`` (dotted layer name), ``candidate`` and ``bits_per_weight``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FAMILY_STYLE = {
    "joint": {"marker": "o", "color": "#1f77b4", "label": "searched: all candidates"},
    "int": {"marker": "s", "color": "#ff7f0e", "label": "searched: integer candidates"},
    "float": {"marker": "^", "color": "#2ca02c", "label": "searched: float candidates"},
}
UNIFORM_STYLE = {"marker": "D", "color": "#555555", "label": "uniform (one candidate everywhere)"}
_ABBREVIATIONS = (("fp8_e4m3", "e4m3"), ("fp8_e5m2", "e5m2"), ("channel", "ch"), ("token", "t"),
                  ("tensor", "T"), ("int", "i"), ("uint", "u"), (":mse", "m"), (":", ""))


def short_name(candidate: str) -> str:
    """A few characters for a heat-map cell: ``int4:g64:mse`` → ``i4g64m``, ``int8:channel`` → ``i8ch``,
    ``keep`` → ``16``."""
    if candidate == "keep":
        return "16"
    text = candidate
    for long, short in _ABBREVIATIONS:
        text = text.replace(long, short)
    return text


def block_and_role(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj`` → ``(3, "self_attn.q_proj")``: the first integer component of the
    dotted name is the block index, what follows it the role; ``(None, name)`` without an integer."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if re.fullmatch(r"\d+", part):
            return int(part), ".".join(parts[i + 1:]) or name
    return None, name


def _canvas(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def allocation_heatmap(rows: Sequence[Mapping[str, Any]], path: Path, title: str | None = None,
                       bits_range: tuple[float, float] | None = None) -> Path:
    """Save the allocation of one plan as a PNG heat map at ``path``; returns ``path``.

    Rows of the picture are block indices (layers without one share a last row ``other``), columns are
    layer roles in first-seen order; the colour is the chosen candidate's bits per weight (every scale
    counted), and each cell carries the candidate's short name (:func:`short_name`). ``bits_range``:
    the colour scale's ends (default: this plan's least and most bits), to compare several plans.
    """
    import numpy as np

    if not rows:
        raise ValueError("expected at least one allocation row to draw, found none")
    placed = [(*block_and_role(str(r["name"])), r) for r in rows]
    blocks = sorted({b for b, _, _ in placed if b is not None})
    row_keys: list[int | None] = [*blocks, *([None] if any(b is None for b, _, _ in placed) else [])]
    roles = list(dict.fromkeys(role for _, role, _ in placed))
    grid = np.full((len(row_keys), len(roles)), np.nan)  # [blocks, roles] bits/weight
    names: dict[tuple[int, int], str] = {}
    for block, role, r in placed:
        i, j = row_keys.index(block), roles.index(role)
        grid[i, j] = float(r["bits_per_weight"])
        names[(i, j)] = short_name(str(r["candidate"]))
    fig = _canvas(min(2.0 + 1.25 * len(roles), 22.0), min(1.8 + 0.32 * len(row_keys), 40.0))
    ax = fig.add_subplot()
    finite = grid[np.isfinite(grid)]
    lo, hi = bits_range if bits_range is not None else (float(finite.min()), float(finite.max()))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
    cmap = image.get_cmap()
    for (i, j), text in names.items():
        red, green, blue, _ = cmap((grid[i, j] - lo) / (hi - lo))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(roles)), roles, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_keys)), ["other" if b is None else str(b) for b in row_keys], fontsize=8)
    ax.set_ylabel("block")
    ax.set_title(title or "bits per weight of the chosen candidate", fontsize=10)
    fig.colorbar(image, ax=ax, label="bits/weight")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _y(point: Mapping[str, Any], measured: bool) -> float | None:
    value = point.get("measured") if measured else point.get("predicted")
    return None if value is None or not math.isfinite(float(value)) else float(value)


def frontier_plot(points: Sequence[Mapping[str, Any]], path: Path, *, measured_name: str = "perplexity",
                  title: str | None = None) -> Path:
    """Save the frontier as a PNG at ``path``; returns ``path``.

    x: bits per weight over the profiled layers. y: the measured value (log scale) when any point has
    one (points without a measurement are left out), else the predicted degradation (log scale, symlog
    when a point predicts 0). One line with markers per searched family, sorted by bits; uniform
    candidates as labelled points; ``keep`` (the unquantized model) as a dashed horizontal line when its
    value is positive, never as a point at 16 bits.
    """
    measured = any(p.get("measured") is not None for p in points)
    keep = [p for p in points if p["family"] == "uniform" and p["label"] == "keep"]
    points = [p for p in points if not (p["family"] == "uniform" and p["label"] == "keep")]
    fig = _canvas(10, 6.5)
    ax = fig.add_subplot()
    for family, style in FAMILY_STYLE.items():
        pts = sorted((p for p in points if p["family"] == family and _y(p, measured) is not None),
                     key=lambda p: p["bits_per_weight"])
        if pts:
            ax.plot([p["bits_per_weight"] for p in pts], [_y(p, measured) for p in pts],
                    marker=style["marker"], color=style["color"], label=style["label"], lw=1.5, ms=7)
    uniform = [p for p in points if p["family"] == "uniform" and _y(p, measured) is not None]
    searched_ys = [y for p in points if p["family"] != "uniform" and (y := _y(p, measured)) is not None]
    cap = 4 * max(searched_ys) if searched_ys and max(searched_ys) > 0 else math.inf
    if uniform:
        ax.scatter([p["bits_per_weight"] for p in uniform], [min(_y(p, measured), cap) for p in uniform],
                   marker=UNIFORM_STYLE["marker"], color=UNIFORM_STYLE["color"], label=UNIFORM_STYLE["label"],
                   s=45, zorder=3)
        seen: dict[float, int] = {}
        # labels of points at one x alternate right/left and stack upwards; points far above every searched plan sit on the
        # top edge with their value in the label, so one collapsed format does not flatten the picture
        for p in sorted(uniform, key=lambda p: (p["bits_per_weight"], _y(p, measured))):
            k = seen[round(p["bits_per_weight"], 1)] = seen.get(round(p["bits_per_weight"], 1), -1) + 1
            y = _y(p, measured)
            text = str(p["label"]) if y <= cap else f"{p['label']} ({y:.3g}, off scale)"
            left = k % 2 == 1  # alternate sides so that labels of nearby points at one x do not collide
            ax.annotate(text, (p["bits_per_weight"], min(y, cap)), xytext=(-6 if left else 6, 4 + 11 * (k // 2)),
                        textcoords="offset points", fontsize=8, color="0.25", ha="right" if left else "left")
    ys = [min(y, cap) for p in points if (y := _y(p, measured)) is not None]
    reference = _y(keep[0], measured) if keep else None
    if reference is not None and reference > 0:
        ax.axhline(reference, color="0.4", ls="--", lw=1, label=f"unquantized ({reference:.4g})")
        ys.append(reference)
    if ys and min(ys) > 0:
        from matplotlib.ticker import ScalarFormatter

        ax.set_yscale("log")
        if max(ys) / min(ys) < 100:  # a narrow range: plain numbers instead of 2x10^1
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(ScalarFormatter())
    elif ys and max(ys) > 0:
        ax.set_yscale("symlog", linthresh=min(y for y in ys if y > 0))
    ax.set_xlabel("bits per weight over the profiled layers (every scale counted)")
    ax.set_ylabel(f"measured {measured_name}" if measured else "predicted degradation (sum of scores)")
    ax.set_title(title or ("measured" if measured else "predicted") + " frontier", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    if ys:
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def rank_correlation(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho of two equally long sequences; None below 3 pairs or when one side is constant."""
    if len(xs) != len(ys):
        raise ValueError(f"expected sequences of equal length, found {len(xs)} and {len(ys)}")
    if len(xs) < 3:
        return None
    from mixq.sensitivity.validate import spearman

    rho = spearman(xs, ys)  # NaN when one side is constant
    return rho if math.isfinite(rho) else None


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def frontier_markdown(report: Mapping[str, Any]) -> str:
    """``frontier.md``: settings, the predicted-vs-measured table, rank correlation, notes, validation.

    ``report`` is the ``frontier.json`` mapping (keys ``model``, ``metric``, ``algorithm``, ``points``,
    ``spearman``, ``notes``, optionally ``measured_name`` and ``validation``).
    """
    name = report.get("measured_name", "perplexity")
    lines = [f"# Frontier: {report.get('model', '?')}", "",
             f"metric `{report.get('metric')}`, algorithm `{report.get('algorithm')}`, "
             f"method `{report.get('method', 'milp')}`; bits per weight over the profiled layers, every "
             "scale counted.", "",
             f"| point | family | budget | bits/w | predicted | measured {name} | quantize s | eval s "
             "| pareto |",
             "|---|---|---:|---:|---:|---:|---:|---:|:-:|"]
    for p in sorted(report.get("points", []), key=lambda p: (p["bits_per_weight"], p["label"])):
        lines.append(f"| {p['label']} | {p['family']} | {_cell(p.get('budget'))} | "
                     f"{p['bits_per_weight']:.3f} | {_cell(p.get('predicted'))} | "
                     f"{_cell(p.get('measured'))} | "
                     f"{_cell(p.get('quantize_s'), 3)} | {_cell(p.get('eval_s'), 3)} | "
                     f"{'yes' if p.get('pareto') else ''} |")
    rho = report.get("spearman")
    if rho is not None:
        lines += ["", f"Spearman rank correlation of predicted and measured {name} over the points: "
                      f"{rho:.3f}."]
    notes = report.get("notes") or []
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    validation = report.get("validation") or {}
    if validation.get("spearman"):
        lines += ["", f"## Profile validation ({len(validation.get('pairs', []))} pairs, measured by "
                  f"{validation.get('measured_by', 'kl')})", "", "| metric | Spearman rho |", "|---|---:|"]
        lines += [f"| {m} | {_cell(r, 3)} |" for m, r in validation["spearman"].items()]
    return "\n".join(lines) + "\n"
