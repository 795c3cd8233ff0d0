"""Report sections of ``mixq frontier``, ``mixq search`` and ``mixq profile`` folders."""

from __future__ import annotations

import math
import statistics
from html import escape
from typing import Any

from mixq.eval.search_report import FAMILY_STYLE, UNIFORM_STYLE
from mixq.report.layers import allocation_svg, exact_rules, nominal_bits, spec_summary
from mixq.report.page import facts, section, switcher, table
from mixq.report.runs import Run, finite_float
from mixq.report.svg import Axes, Point, Series, bars, heatmap, line_plot


def _tip(p: dict[str, Any], measured_name: str | None) -> str:
    lines = [f"{p['label']} ({p['family']})", f"{float(p['bits_per_weight']):.4f} bits/weight",
             f"predicted {float(p['predicted']):.4g}"]
    if p.get("measured") is not None:
        lines.append(f"{measured_name or 'measured'} {float(p['measured']):.5g}")
    if p.get("allocation"):
        lines.append("plan: " + spec_summary([str(a) for a in p["allocation"]]))
    return "\n".join(lines)


def frontier_plot(points: list[dict[str, Any]], key: str, measured_name: str | None, plot_id: str) -> str:
    """The frontier as SVG: one line per searched family, uniform candidates as labelled diamonds,
    ``keep`` (the unquantized model) as a dashed line; y = ``key`` (``measured`` or ``predicted``)."""
    series = []
    for family, style in FAMILY_STYLE.items():
        pts = [Point(float(p["bits_per_weight"]), y, _tip(p, measured_name), str(p["label"]))
               for p in points if p["family"] == family and (y := finite_float(p.get(key))) is not None]
        if pts:
            series.append(Series(str(style["label"]), pts, str(style["color"]),
                                 marker={"o": "circle", "s": "square"}.get(str(style["marker"]), "diamond")))
    uniform = [Point(float(p["bits_per_weight"]), y, _tip(p, measured_name), str(p["label"]), str(p["label"]))
               for p in points if p["family"] == "uniform" and p["label"] != "keep"
               and (y := finite_float(p.get(key))) is not None]
    if uniform:
        series.append(Series(str(UNIFORM_STYLE["label"]), uniform, str(UNIFORM_STYLE["color"]), line=False,
                             marker="diamond"))
    hlines = [(y, f"unquantized ({y:.5g})") for p in points if p["family"] == "uniform" and p["label"] == "keep"
              and (y := finite_float(p.get(key))) is not None and y > 0]
    y_label = (measured_name or "measured") if key == "measured" else "predicted degradation"
    return line_plot(series, Axes("bits per weight (every scale counted)", y_label, log_y=True, hlines=hlines),
                     plot_id)


def frontier_sections(run: Run) -> list[str]:
    """Summary, frontier plot(s), allocation heat maps and the points table of a frontier folder."""
    d = run.data
    points = [p for p in d.get("points") or [] if finite_float(p.get("bits_per_weight")) is not None]
    name = d.get("measured_name")
    measured = any(p.get("measured") is not None for p in points)
    summary = facts({"model": d.get("model"), "metric (predicted degradation)": d.get("metric"),
                     "algorithm": d.get("algorithm"), "solver": d.get("method"), "budgets": d.get("budgets"),
                     "families": d.get("families"), "measured": name if measured else "no (predicted only)",
                     "rank correlation predicted / measured": d.get("spearman"), "points": len(points)})
    notes = "".join(f"<li>{n}</li>" for n in map(escape, d.get("notes") or []))
    out = [section("Frontier run", summary + (f"<ul>{notes}</ul>" if notes else ""), "summary")]
    if measured:
        plots = switcher("frontier-y", "y axis", [
            ("measured", name or "measured", frontier_plot(points, "measured", name, "frontier-plot")),
            ("predicted", "predicted degradation", frontier_plot(points, "predicted", name, "frontier-predicted"))])
    else:
        plots = frontier_plot(points, "predicted", name, "frontier-plot")
    hint = "<p class=muted>Hover a point for its plan; click a searched point to show its allocation below.</p>"
    out.append(section("Frontier", hint + plots, "frontier"))
    out.append(section("Per-layer allocation", _allocations(run, points), "allocation"))
    headers = ["point", "family", "budget", "bits/weight", "predicted", name or "measured", "quantize s",
               "eval s", "solve s", "optimal", "pareto", "plan"]
    rows = [[p["label"], p["family"], p.get("budget"), p["bits_per_weight"], p.get("predicted"), p.get("measured"),
             p.get("quantize_s"), p.get("eval_s"), p.get("solve_s"), p.get("optimal"), p.get("pareto"),
             spec_summary([str(a) for a in p.get("allocation") or []]) or p.get("plan")]
            for p in sorted(points, key=lambda p: float(p["bits_per_weight"]))]
    out.append(section("Points", table(headers, rows, keys=[str(r[0]) for r in rows], table_id="points"),
                        "points"))
    return out


def _allocations(run: Run, points: list[dict[str, Any]]) -> str:
    bits = {str(p["label"]): float(p["bits_per_weight"]) for p in points if p["family"] == "uniform"}
    plans: dict[str, list[Any]] = run.extra.get("plans", {})

    def cand_bits(cand: str) -> float | None:
        return bits[cand] if cand in bits else nominal_bits(cand)

    choices = []
    searched = [p for p in points if p["family"] != "uniform" and plans.get(str(p["label"]))]
    every = [cand_bits(c) for p in searched for _, c in exact_rules(plans[str(p["label"])])]
    known = [b for b in every if b is not None]
    lo, hi = (min(known), max(known)) if known else (None, None)
    for p in sorted(searched, key=lambda p: (p["family"], float(p["bits_per_weight"]))):
        label = str(p["label"])
        rows = [(layer, cand, cand_bits(cand), "") for layer, cand in exact_rules(plans[label])]
        if rows:
            text = f"{label}: {float(p['bits_per_weight']):.3f} bits/weight"
            choices.append((label, text, allocation_svg(rows, f"alloc-{len(choices)}", lo=lo, hi=hi)))
    if not choices:
        return "<p class=muted>No searched plan with per-layer rules in this folder.</p>"
    return switcher("allocation", "plan", choices)


def search_sections(run: Run) -> list[str]:
    """Summary, allocation heat map and per-layer table of a ``mixq search`` folder."""
    d = run.data
    rows = [r for r in d.get("layers") or [] if isinstance(r, dict)]
    metric = str(d.get("metric") or "")
    summary = facts({"metric": metric, "budget (bits/weight)": d.get("budget"),
                     "bits/weight": d.get("bits_per_weight"), "predicted": d.get("predicted"),
                     "solver": d.get("method"), "optimal": d.get("optimal"), "solve s": d.get("solve_s"),
                     "candidates": d.get("candidates"), "plan": spec_summary([str(r.get("candidate")) for r in rows])})
    heat = allocation_svg([(str(r["name"]), str(r.get("candidate")), finite_float(r.get("bits_per_weight")),
                            f"{metric} {r.get(metric)}") for r in rows], "alloc-0") if rows else ""
    layer_rows = [[r.get("name"), r.get("candidate"), r.get("bits_per_weight"), r.get(metric)] for r in rows]
    return [section("Search run", summary, "summary"), section("Per-layer allocation", heat, "allocation"),
            section("Layers", table(["layer", "candidate", "bits/weight", metric], layer_rows), "layers")]


def profile_sections(run: Run) -> list[str]:
    """Summary, sensitivity heat maps (layers x candidates, one per metric), per-candidate bars and the
    per-candidate summary of a profile folder."""
    d = run.data
    meta = d.get("meta") or {}
    layers = [str(layer.get("name")) for layer in d.get("layers") or []]
    cands = [str(c) for c in d.get("candidates") or []]
    scores: dict[str, list[list[Any]]] = d.get("scores") or {}
    seconds: dict[str, list[list[Any]]] = d.get("seconds") or {}
    summary = facts({"model": d.get("model"), "fingerprint": d.get("fingerprint"), "kind": meta.get("kind"),
                     "calibration": meta.get("calibration"), "samples": meta.get("samples"),
                     "length": meta.get("length"), "metrics": list(scores), "layers": len(layers),
                     "candidates": cands, "seconds": meta.get("seconds")})
    heats, bar_choices = [], []
    for m, grid in scores.items():
        values = [[finite_float(v) for v in row] for row in grid]
        tips = [[f"{layers[i]}\n{cands[j]}: {m} {v:.4g}" if v is not None else f"{cands[j]} does not fit {layers[i]}"
                 for j, v in enumerate(row)] for i, row in enumerate(values)]
        texts = [[f"{v:.2g}" if v is not None else "" for v in row] for row in values]
        heats.append((m, m, heatmap(layers, cands, values, texts, tips, f"sens-{m}", value_label=f"{m} score",
                                    log=True)))
    first = next(iter(scores), None)
    if first is not None:
        for j, c in enumerate(cands):
            col = [finite_float(row[j]) for row in scores[first]]
            if any(v for v in col):
                bar_choices.append((f"bar-{c}", c, bars(layers, [v if v is not None else math.nan for v in col],
                                                         [f"{layers[i]}: {first} {col[i]}" for i in range(len(layers))],
                                                         f"bars-{j}", value_label=f"{first} score of {c}", log=True)))
    cand_rows = []
    for j, c in enumerate(cands):
        row: list[Any] = [c, sum(1 for r in next(iter(scores.values()), []) if finite_float(r[j]) is not None)]
        for m, grid in scores.items():
            col = [v for r in grid if (v := finite_float(r[j])) is not None]
            row.append(statistics.median(col) if col else None)
            row.append(sum(v for r in seconds.get(m, []) if (v := finite_float(r[j])) is not None) if m in seconds else None)
        cand_rows.append(row)
    headers = ["candidate", "layers"] + [h for m in scores for h in (f"median {m}", f"{m} s")]
    out = [section("Profile run", summary, "summary"),
           section("Sensitivity per layer", "<p class=muted>Score of quantizing one layer with one candidate "
                    "(larger is worse; colour on a log scale).</p>" + switcher("sensitivity", "metric", heats),
                    "sensitivity"),
           section("Sensitivity per candidate", switcher("bars", "candidate", bar_choices), "bars"),
           section("Candidates", table(headers, cand_rows), "candidates")]
    validation = d.get("validation")
    if isinstance(validation, dict):
        simple = {k: v for k, v in validation.items() if isinstance(v, str | int | float) or v is None}
        out.append(section("Validation (measured KL against the metrics)", facts(simple), "validation"))
    return out
