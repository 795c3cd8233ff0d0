"""End-to-end functions behind ``mixq profile``, ``mixq search`` and ``mixq frontier``.

``profile_model`` loads a model, draws calibration batches and writes a sensitivity table (layer ×
candidate scores); ``search_plan`` turns a table and a budget into a plan with the ILP of
:mod:`mixq.search`; ``frontier`` sweeps budgets per candidate family, adds the uniform candidates and
optionally quantizes and evaluates every plan. Output folders are written next to their destination and
renamed into place: a reader never sees half of one, and an error leaves none behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixq.model.run_folder import check_target
from mixq.plan import DEFAULT_CANDIDATES, Candidate, Plan, PlanError, candidate_named, parse_candidates
from mixq.search.build import (allocation_rows, load_constraints, pins_from_patterns, plan_from_choice,
                               tie_groups)
from mixq.search.costs import LatencyTable, bits_per_weight, cost_matrix
from mixq.search.errors import InfeasibleError, SearchError
from mixq.search.solve import Constraint, Solution, solve
from mixq.sensitivity.table import SensitivityTable

Progress = Callable[[str, int, int], None]
Status = Callable[[str], None]


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool, source: Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it replaces ``out``, on error it is
    removed.

    ``OutputExistsError`` when ``out`` exists and not ``overwrite``, or when ``out`` is ``source``.
    """
    out = Path(out)
    check_target(out, source, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"expected {name} >= 1, found {value}")


# --- profile --------------------------------------------------------------------------------------------
def calibration_batches(model: Any, tokenizer: Any, calib: str, samples: int, length: int, batch_size: int,
                        seed: int = 0) -> tuple[str, list[dict[str, Any]]]:
    """``(kind, batches)``: ``lm`` with ``{"input_ids": [B, length]}`` windows of ``calib`` (wiki protocol,
    ``seed``), or ``encoder`` with tokenizer outputs of ``samples * 16`` wiki sentences."""
    from mixq.pipeline import calibration_tokens, is_encoder

    if is_encoder(model):
        from mixq.eval.corpus import wiki_sentences
        from mixq.eval.lm_metrics import encoder_batches

        if str(calib).strip().lower() != "wiki" or tokenizer is None:
            raise ValueError(f"an encoder is profiled on wiki sentences with its tokenizer; found --calib "
                             f"{calib!r}{' and no tokenizer' if tokenizer is None else ''}")
        return "encoder", encoder_batches(tokenizer, wiki_sentences(samples * 16, seed=seed))
    tokens = calibration_tokens(tokenizer, calib, samples, length, seed)  # [samples, length]
    return "lm", [{"input_ids": tokens[i:i + batch_size]} for i in range(0, samples, batch_size)]


def profile_model(model_name: str, candidates: str | Sequence[str] = DEFAULT_CANDIDATES, *,
                  metrics: Sequence[str] = ("weight", "fisher", "hessian"), calib: str = "wiki",
                  samples: int = 16, length: int = 512, batch_size: int = 2,
                  keep: Sequence[str] = ("lm_head",), validate: int = 0, validate_samples: int = 4,
                  hutchinson_samples: int = 4, seed: int = 0, out: str | os.PathLike[str] | None = None,
                  overwrite: bool = False, progress: Progress | None = None,
                  status: Status | None = None) -> SensitivityTable:
    """Profile ``model_name`` (name or folder): every layer × candidate scored by ``metrics``.

    Every argument and the output folder are checked before the model is loaded. With ``validate`` > 0,
    ``kl`` is measured on that many random (layer, candidate) pairs and ranked against each metric, on
    the first ``validate_samples`` calibration samples (LM windows; encoders: ``16 x`` that many sentences).
    ``out``: folder receiving ``profile.json`` and ``profile.csv``.
    """
    from mixq.model.load import load_model, resolve
    from mixq.pipeline import load_tokenizer
    from mixq.sensitivity.profile import METRICS, profile
    from mixq.sensitivity.validate import validate as validate_table

    cands = parse_candidates(candidates)
    metrics = [m.strip() for m in metrics if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise ValueError(f"expected metrics among {', '.join(METRICS)}, found {', '.join(metrics) or 'none'}")
    _positive(samples=samples, length=length, batch_size=batch_size, hutchinson_samples=hutchinson_samples,
              validate_samples=validate_samples)
    if validate < 0:
        raise ValueError(f"expected validate >= 0 pairs, found {validate}")
    source = resolve(model_name)
    if out is not None:
        check_target(Path(out), source, overwrite)
    say = status or (lambda _m: None)
    t0 = time.perf_counter()
    model = load_model(model_name, status=say)
    tokenizer = load_tokenizer(model_name)
    load_s = time.perf_counter() - t0
    say(f"calibration: {samples} samples from {calib}")
    kind, batches = calibration_batches(model, tokenizer, calib, samples, length, batch_size, seed)
    table = profile(model, cands, batches, kind=kind, metrics=tuple(metrics), keep=tuple(keep),
                    model_name=model_name, hutchinson_samples=hutchinson_samples, seed=seed,
                    progress=progress)
    table.meta.update(model=model_name, calibration=calib, samples=samples, length=length,
                      batch_size=batch_size, keep=list(keep), load_seconds=round(load_s, 3))
    if validate:
        per_batch = batch_size if kind == "lm" else 16
        subset = batches[:max(1, -(-validate_samples // per_batch))]
        validate_table(table, model, subset, pairs=validate, seed=seed, progress=progress)
        table.validation["batches"] = len(subset)
    if out is not None:
        with staged_folder(Path(out), overwrite, source) as tmp:
            table.save(tmp)
    return table


def json_safe(obj: Any) -> Any:
    """A JSON-ready copy: numpy scalars and arrays to Python, NaN and infinities to None, paths to strings."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [json_safe(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def profile_summary(table: SensitivityTable) -> list[dict[str, Any]]:
    """Per candidate: layers it applies to, bits per weight over them, median score and seconds per metric."""
    rows = []
    applicable = table.applicable()  # [L, C] bool
    metrics = list(table.scores)
    for c, cand in enumerate(table.candidate_objects()):
        idx = np.flatnonzero(applicable[:, c])
        params = sum(table.layers[i].params for i in idx)
        bits = sum(cand.weight_bits(table.layers[i].shape) for i in idx)
        row: dict[str, Any] = {"candidate": cand.name, "family": cand.family, "layers": int(len(idx)),
                               "bits_per_weight": bits / params if params else None}
        for m in metrics:
            values = table.scores[m][idx, c]
            row[m] = float(np.median(values)) if len(idx) else None
            row[f"{m}_s"] = float(np.nansum(table.seconds[m][:, c])) if m in table.seconds else None
        rows.append(row)
    return rows


# --- search ---------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """A search problem drawn from a table: scores (disallowed candidates NaN) and its constraints."""

    layers: list[Any]
    candidates: list[Candidate]
    scores: np.ndarray  # [L, C] float64, NaN = not allowed
    allowed: list[int]  # candidate indices the user allows
    groups: list[list[int]]
    pins: dict[int, int]
    extra: list[Constraint]  # non-bits constraints (latency, bops)
    budget: float | None  # bits per weight over the profiled layers
    params: int


def _merge_groups(groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """Union of overlapping index groups (so that each layer is in at most one group)."""
    merged: list[set[int]] = []
    for g in groups:
        s = set(int(i) for i in g)
        for other in [m for m in merged if m & s]:
            s |= other
            merged.remove(other)
        merged.append(s)
    return [sorted(s) for s in merged if len(s) > 1]


def build_problem(table: SensitivityTable, metric: str = "fisher", *, budget: float | None = None,
                  candidates: Sequence[str] | None = None, latency: float | None = None,
                  latency_table: str | os.PathLike[str] | None = None, bops: float | None = None,
                  pins: Mapping[str, str] | None = None, tie: bool = True,
                  constraints: str | os.PathLike[str] | None = None) -> Problem:
    """Scores, groups, pins and constraints of a search on ``table``; flags win over the constraints file."""
    layers, cands = list(table.layers), table.candidate_objects()
    scores = np.array(table.metric(metric), dtype=np.float64)  # [L, C]
    allowed = list(range(len(cands)))
    if candidates is not None:
        names = [n.strip() for n in candidates if n.strip()]
        if not names:
            raise PlanError("expected at least one candidate of the profile "
                            f"({', '.join(table.candidates)}), found none")
        allowed = sorted({cands.index(candidate_named(cands, n)) for n in names})
        scores[:, [c for c in range(len(cands)) if c not in allowed]] = np.nan
    file = load_constraints(constraints, layers, cands) if constraints is not None else {}
    limits = dict(file.get("budget") or {})
    for kind, value in (("bits", budget), ("latency", latency), ("bops", bops)):  # flags win over the file
        if value is not None:
            limits[kind] = value
    table_path = latency_table if latency_table is not None else file.get("latency_table")
    lat = table_path if isinstance(table_path, LatencyTable) else (
        LatencyTable.load(table_path) if table_path is not None else None)
    if "latency" in limits and lat is None:
        raise SearchError("a latency budget needs a latency table "
                          "(--latency-table CSV with layer,candidate,seconds)")
    extra = [Constraint(kind, cost_matrix(layers, cands, kind, lat), float(limits[kind]))
             for kind in ("bytes", "latency", "bops") if kind in limits]
    pinned = dict(file.get("pin") or {})
    if pins:
        pinned.update(pins_from_patterns(layers, cands, pins))
    groups = (tie_groups(layers) if tie else []) + [list(g) for g in file.get("tie") or []]
    budget_bits = limits.get("bits")
    if budget_bits is not None and not budget_bits > 0:
        raise SearchError(f"expected a positive bits/weight budget, found {budget_bits}")
    return Problem(layers, cands, scores, allowed, _merge_groups(groups), pinned, extra,
                   None if budget_bits is None else float(budget_bits), sum(layer.params for layer in layers))


def bits_constraint(problem: Problem, budget: float) -> Constraint:
    """The bits budget (bits/weight over the profiled layers) as a total-bits constraint."""
    costs = cost_matrix(problem.layers, problem.candidates, "bits")  # [L, C] total bits
    return Constraint("bits", costs, budget * problem.params, per_weight=budget)


@dataclass
class SearchResult:
    """A searched plan with its solution and per-layer allocation."""

    plan: Plan
    solution: Solution
    rows: list[dict[str, Any]]
    bits_per_weight: float
    predicted: float
    metric: str
    budget: float | None
    candidates: list[str]
    out: Path | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        s = self.solution
        return json_safe({
            "out": str(self.out) if self.out else None, "metric": self.metric, "budget": self.budget,
            "bits_per_weight": self.bits_per_weight, "predicted": self.predicted,
            "candidates": self.candidates, "method": s.method, "optimal": bool(s.optimal),
            "solve_s": s.seconds, "totals": {k: float(v) for k, v in s.totals.items()}, "layers": self.rows,
            "notes": self.notes, "plan": self.plan.to_dict()})


def search_plan(table: SensitivityTable, budget: float | None = None, *, metric: str = "fisher",
                candidates: Sequence[str] | None = None, latency: float | None = None,
                latency_table: str | os.PathLike[str] | None = None, bops: float | None = None,
                pins: Mapping[str, str] | None = None, tie: bool = True,
                constraints: str | os.PathLike[str] | None = None, algorithm: str = "gptq",
                method: str = "milp", time_limit: float = 30.0, out: str | os.PathLike[str] | None = None,
                overwrite: bool = False) -> SearchResult:
    """The plan of least predicted degradation (``metric``) within the budgets.

    ``budget``: bits per weight over the profiled layers, every scale counted. ``out``: folder receiving
    ``plan.yaml``, ``search.json``, ``allocation.csv`` and ``allocation.png``.
    """
    from mixq.eval.search_report import allocation_heatmap
    from mixq.fileio import atomic_write_text

    if out is not None:
        check_target(Path(out), None, overwrite)
    problem = build_problem(table, metric, budget=budget, candidates=candidates, latency=latency,
                            latency_table=latency_table, bops=bops, pins=pins, tie=tie,
                            constraints=constraints)
    cons = ([bits_constraint(problem, problem.budget)] if problem.budget is not None else []) + problem.extra
    if not cons:
        raise SearchError("expected a budget: --budget BITS, --latency, --bops or a budget in --constraints")
    solution = solve(problem.scores, cons, groups=problem.groups, pinned=problem.pins, method=method,
                     time_limit=time_limit)
    keep = tuple(table.meta.get("keep") or ("lm_head",))
    layers, cands, choice = problem.layers, problem.candidates, solution.choice
    plan = plan_from_choice(layers, cands, choice, algorithm=algorithm, keep=keep)
    rows = allocation_rows(layers, cands, choice)
    for row, s in zip(rows, problem.scores[np.arange(len(layers)), choice]):
        row[metric] = float(s)
    notes = [] if solution.optimal or method not in ("milp", "brute") else [
        f"stopped at the time limit ({time_limit:g} s): feasible, not proven optimal"]
    result = SearchResult(plan, solution, rows, bits_per_weight(layers, cands, choice),
                          float(solution.objective), metric, problem.budget,
                          [cands[c].name for c in problem.allowed], notes=notes)
    if out is not None:
        import json

        with staged_folder(Path(out), overwrite) as tmp:
            result.out = Path(out)
            plan.save(tmp / "plan.yaml")
            text = json.dumps(result.to_json(), indent=1, allow_nan=False) + "\n"
            atomic_write_text(tmp / "search.json", text)
            atomic_write_text(tmp / "allocation.csv", allocation_csv(rows))
            allocation_heatmap(rows, tmp / "allocation.png",
                               title=f"{table.model}: {result.bits_per_weight:.3f} bits/weight, {metric}")
    return result


def allocation_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The allocation rows as CSV text (header from the first row's keys)."""
    import csv
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def check_profile_model(table: SensitivityTable, model_name: str, status: Status | None = None) -> None:
    """Load ``model_name`` and raise ProfileError when its layers differ from the profile's."""
    from mixq.model.load import load_model
    from mixq.sensitivity.profile import profile_layers
    from mixq.sensitivity.table import model_fingerprint

    model = load_model(model_name, status=status)
    keep = tuple(table.meta.get("keep") or ("lm_head",))
    infos = profile_layers(model, keep=keep)
    found = [(i.name, tuple(i.shape)) for i in infos]
    table.check_model(model_fingerprint(found), found)


# --- frontier -------------------------------------------------------------------------------------------
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


def _family_points(problem: Problem, family: str, budgets: Sequence[float], method: str,
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
    _positive(eval_windows=eval_windows, calib_samples=calib_samples, batch_size=batch_size)
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


def _write_frontier(result: FrontierResult, plans: Mapping[str, Plan], problem: Problem, out: Path,
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
