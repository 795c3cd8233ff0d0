"""The function behind ``mixq frontier``: searched plans at several budgets per candidate family, the
uniform candidates beside them, and (optionally) every plan quantized and evaluated.

Families: ``joint`` (every candidate), ``int`` (integer-element candidates and keep), ``float``
(floating-point-element candidates and keep) — the FLIQS comparison of one joint search against two
single-family ones. The output folder holds frontier.json/.md/.png, plans/LABEL.yaml and one
allocation heat map per searched plan; it is staged and renamed into place like every mixq output.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixq.model.run_folder import check_target
from mixq.plan import Plan
from mixq.search.build import allocation_rows, plan_from_choice
from mixq.search.costs import cost_matrix
from mixq.search.errors import InfeasibleError, SearchError
from mixq.search_pipeline import (SearchSetup, Progress, Status, check_positive, build_problem, check_profile_model,
                                  json_safe, staged_folder)
from mixq.sensitivity.table import SensitivityTable


FAMILIES = ("joint", "int", "float")


@dataclass
class FrontierResult:
    """Searched points per family and uniform points, optionally measured; ``points`` as in frontier.json."""

    model: str
    metric: str
    algorithm: str
    method: str
    budgets: list[float]
    families: list[str]
    points: list[dict[str, Any]]
    measured_name: str | None = None  # 'perplexity' | '1 - cosine' when measured
    spearman: float | None = None
    notes: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    out: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return json_safe({
            "out": str(self.out) if self.out else None, "model": self.model, "metric": self.metric,
            "algorithm": self.algorithm, "method": self.method, "budgets": self.budgets,
            "families": self.families, "measured": self.measured_name is not None,
            "measured_name": self.measured_name, "spearman": self.spearman, "points": self.points,
            "notes": self.notes, "validation": self.validation})


def _file_label(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._@-" else "_" for ch in label)


def _family_points(problem: SearchSetup, family: str, budgets: Sequence[float], method: str,
                   time_limit: float) -> tuple[list[Any], list[str], Exception | None]:
    """Searched frontier points of one family (``joint``: every allowed candidate; ``int``/``float``: those
    with integer / float elements, plus ``keep``), relabelled ``FAMILY@BUDGET``."""
    from dataclasses import replace

    from mixq.search.frontier import sweep

    allowed = [c for c in problem.allowed
               if family == "joint" or problem.candidates[c].family in (family, "keep")]
    if not any(problem.candidates[c].family == family for c in allowed) and family != "joint":
        return [], [f"{family}: no {family} candidate in the profile (or --candidates); skipped"], None
    try:
        points, notes = sweep(problem.scores, problem.layers, problem.candidates, budgets,
                              extra=problem.extra, groups=problem.groups, pinned=problem.pins, method=method,
                              time_limit=time_limit, allowed=allowed)
    except InfeasibleError as err:
        return [], [f"{family}: {err}"], err
    relabelled = [replace(p, label=f"{family}@{p.budget:g}") for p in points]
    return relabelled, [f"{family}: {n}" for n in notes], None


def _measure(model_name: str, plan: Plan, *, kind: str, calib: str, samples: int, length: int,
             batch_size: int, eval_windows: int, progress: Progress | None) -> dict[str, Any]:
    """Quantize ``model_name`` with ``plan`` and evaluate it: perplexity on the calibration source's test
    split (LM), or ``1 - cosine`` to the source model's mean-pooled embeddings (encoder)."""
    from mixq.pipeline import evaluate, quantize

    outcome = quantize(model_name, plan, calib=calib, samples=samples, length=length, batch_size=batch_size,
                       progress=progress)
    if kind == "encoder":
        ev = evaluate(model_name, model=outcome.model, reference=model_name, windows=eval_windows)
        measured = 1.0 - float(ev.cosine)
    else:
        ev = evaluate(model_name, model=outcome.model, compare=False, data=calib, windows=eval_windows,
                      length=length)
        measured = float(ev.ppl)
    return {"measured": measured, "ppl": ev.ppl, "cosine": ev.cosine, "quantize_s": outcome.report.seconds,
            "eval_s": ev.seconds}


def frontier(table: SensitivityTable, budgets: Sequence[float], *, metric: str = "fisher",
             families: Sequence[str] = ("joint",), algorithm: str = "gptq", measure: bool = False,
             model_name: str | None = None, eval_windows: int = 32, calib: str | None = None,
             calib_samples: int = 64, length: int | None = None, batch_size: int = 8,
             candidates: Sequence[str] | None = None, pins: Mapping[str, str] | None = None, tie: bool = True,
             constraints: str | os.PathLike[str] | None = None, latency: float | None = None,
             latency_table: str | os.PathLike[str] | None = None, bops: float | None = None,
             method: str = "milp", time_limit: float = 30.0, measure_uniform: str = "budget",
             out: str | os.PathLike[str] | None = None,
             overwrite: bool = False, progress: Progress | None = None,
             status: Status | None = None) -> FrontierResult:
    """Searched plans at each bits/weight budget for each family, plus every uniform candidate.

    With ``measure``, each plan is quantized (``algorithm``, ``calib_samples`` windows of ``length`` tokens
    of ``calib``; defaults: the profile's source and length) and evaluated on ``eval_windows`` test windows.
    ``measure_uniform``: which uniform candidates are measured too: ``all``, ``budget`` (those with at
    most the largest budget's bits per weight, the ones a searched plan is compared with, and ``keep``)
    or ``none`` (``keep`` only).
    ``out``: folder receiving frontier.json, frontier.md, frontier.png, plans/LABEL.yaml and
    allocation/LABEL.png (one heat map per searched plan).
    """
    from mixq.eval.search_report import rank_correlation
    from mixq.search.frontier import pareto, uniform_points

    say = status or (lambda _m: None)
    fams = list(dict.fromkeys(f.strip() for f in families if f.strip()))
    if not fams or any(f not in FAMILIES for f in fams):
        raise ValueError(f"expected families among {', '.join(FAMILIES)}, found {', '.join(fams) or 'none'}")
    budgets = sorted({float(b) for b in budgets})
    if not budgets or budgets[0] <= 0:
        raise ValueError(f"expected positive bits/weight budgets, found {budgets or 'none'}")
    check_positive(eval_windows=eval_windows, calib_samples=calib_samples, batch_size=batch_size)
    if measure_uniform not in ("all", "budget", "none"):
        raise ValueError(f"expected measure_uniform all, budget or none, found {measure_uniform!r}")
    if out is not None:
        check_target(Path(out), None, overwrite)
    problem = build_problem(table, metric, candidates=candidates, latency=latency,
                            latency_table=latency_table, bops=bops, pins=pins, tie=tie,
                            constraints=constraints)
    searched: list[tuple[str, Any]] = []
    notes: list[str] = []
    errors: list[Exception] = []
    for fam in fams:
        pts, fam_notes, error = _family_points(problem, fam, budgets, method, time_limit)
        searched += [(fam, p) for p in pts]
        notes += fam_notes
        errors += [error] if error is not None else []
    if not searched:
        if errors:
            raise errors[0]
        raise SearchError(f"no searched point: {'; '.join(notes)}")
    raw = np.array(table.metric(metric), dtype=np.float64)
    uniform, uniform_notes = uniform_points(raw, problem.layers, problem.candidates)
    allowed_names = {problem.candidates[c].name for c in problem.allowed}
    uniform = [p for p in uniform if p.label in allowed_names]
    notes += [f"uniform: {n}" for n in uniform_notes]
    entries = searched + [("uniform", p) for p in uniform]
    keep = tuple(table.meta.get("keep") or ("lm_head",))
    plans = {p.label: plan_from_choice(problem.layers, problem.candidates, p.choice, algorithm=algorithm,
                                       keep=keep) for _, p in entries}
    points = [{"family": fam, "label": p.label, "budget": p.budget,
               "bits_per_weight": float(p.bits_per_weight), "predicted": float(p.predicted),
               "optimal": bool(p.solution.optimal) if p.solution is not None else None,
               "method": p.solution.method if p.solution is not None else None,
               "solve_s": float(p.solution.seconds) if p.solution is not None else None,
               "plan": f"plans/{_file_label(p.label)}.yaml",
               "allocation": [problem.candidates[int(c)].name for c in p.choice],
               "measured": None, "ppl": None, "quantize_s": None, "eval_s": None} for fam, p in entries]
    measured_name = None
    if measure:
        name = model_name or table.model
        kind = str(table.meta.get("kind", "lm"))
        measured_name = "1 - cosine" if kind == "encoder" else "perplexity"
        say(f"checking {name} against the profile")
        check_profile_model(table, name, status=say)
        source = calib or str(table.meta.get("calibration") or "wiki")
        window = int(length or table.meta.get("length") or 512)
        done: dict[str, dict[str, Any]] = {}  # plan text -> measurement (identical plans measured once)
        def wanted(point: dict[str, Any]) -> bool:
            if point["family"] != "uniform" or point["label"] == "keep" or measure_uniform == "all":
                return True
            return measure_uniform == "budget" and point["bits_per_weight"] <= budgets[-1] + 1e-9

        for i, point in enumerate(points):
            if not wanted(point):
                continue
            text = plans[point["label"]].dumps()
            if text not in done:
                say(f"measuring {point['label']} ({i + 1}/{len(points)})")
                bar = None if progress is None else (
                    lambda stage, d, t, label=point["label"]: progress(f"{label}: {stage}", d, t))
                done[text] = _measure(name, plans[point["label"]], kind=kind, calib=source,
                                      samples=calib_samples, length=window, batch_size=batch_size,
                                      eval_windows=eval_windows, progress=bar)
            point.update({k: done[text][k] for k in ("measured", "ppl", "quantize_s", "eval_s")})
    by_label = {p["label"]: p for p in points}
    key = "measured" if measure else "predicted"
    front = pareto([p for _, p in entries if by_label[p.label][key] is not None],
                   key=lambda fp: by_label[fp.label][key])
    for fp in front:
        by_label[fp.label]["pareto"] = True
    for p in points:
        p.setdefault("pareto", False)
    spearman = None
    if measure:
        pairs = [(p["predicted"], p["measured"]) for p in points if p["measured"] is not None]
        spearman = rank_correlation([a for a, _ in pairs], [b for _, b in pairs])
    result = FrontierResult(table.model, metric, algorithm, method, budgets, fams, points, measured_name,
                            spearman, notes, table.validation)
    if out is not None:
        _write_frontier(result, plans, problem, Path(out), overwrite)
    return result


def _write_frontier(result: FrontierResult, plans: Mapping[str, Plan], problem: SearchSetup, out: Path,
                    overwrite: bool) -> None:
    import json

    from mixq.eval.search_report import allocation_heatmap, frontier_markdown, frontier_plot
    from mixq.fileio import atomic_write_text

    bits = cost_matrix(problem.layers, problem.candidates, "bits")  # [L, C] total bits
    per_weight = bits / np.array([layer.params for layer in problem.layers], dtype=np.float64)[:, None]
    allowed = per_weight[:, problem.allowed][np.isfinite(problem.scores[:, problem.allowed])]
    bits_range = (float(allowed.min()), float(allowed.max())) if allowed.size else None
    with staged_folder(out, overwrite) as tmp:
        result.out = out
        (tmp / "plans").mkdir()
        (tmp / "allocation").mkdir()
        for p in result.points:
            plans[p["label"]].save(tmp / p["plan"])
            if p["family"] != "uniform":
                choice = np.array([[c.name for c in problem.candidates].index(n) for n in p["allocation"]])
                rows = allocation_rows(problem.layers, problem.candidates, choice)
                allocation_heatmap(rows, tmp / "allocation" / f"{_file_label(p['label'])}.png",
                                   title=f"{p['label']}: {p['bits_per_weight']:.3f} bits/weight",
                                   bits_range=bits_range)
        report = result.to_json()
        atomic_write_text(tmp / "frontier.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
        atomic_write_text(tmp / "frontier.md", frontier_markdown(report))
        frontier_plot(result.points, tmp / "frontier.png", measured_name=result.measured_name or "perplexity",
                      title=f"{result.model}: {result.metric} frontier")
