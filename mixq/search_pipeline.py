"""End-to-end functions behind ``mixq profile``, ``mixq search`` and ``mixq frontier``.

``profile_model`` loads a model, draws calibration batches and writes a sensitivity table (layer ×
candidate scores); ``search_plan`` turns a table and a budget into a plan with the ILP of
:mod:`mixq.search`; ``frontier`` sweeps budgets per candidate family, adds the uniform candidates and
optionally quantizes and evaluates every plan (:mod:`mixq.frontier_pipeline`). Output folders are written next to their destination and
renamed into place: a reader never sees half of one, and an error leaves none behind.
"""

from __future__ import annotations

import contextlib
import os
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
from mixq.search.errors import SearchError
from mixq.search.solve import Constraint, Solution, solve
from mixq.sensitivity.table import SensitivityTable

Progress = Callable[[str, int, int], None]
Status = Callable[[str], None]


@contextlib.contextmanager
def staged_folder(out: Path, overwrite: bool, source: Path | None = None) -> Iterator[Path]:
    """:func:`mixq.fileio.atomic_folder` after the output checks: ``OutputExistsError`` when ``out``
    exists and not ``overwrite``, or when ``out`` is ``source``. The folder gets ``environment.json``."""
    from mixq.fileio import atomic_folder
    from mixq.run_info import write_environment

    out = Path(out)
    check_target(out, source, overwrite)
    with atomic_folder(out) as tmp:
        write_environment(tmp)
        yield tmp


def check_positive(**values: int) -> None:
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
                  metrics: Sequence[str] = ("weight", "fisher", "fisher_model"), calib: str = "wiki",
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

    Started by torchrun (``WORLD_SIZE`` > 1), the ranks split the (layer, candidate) pairs and the
    empirical Fisher's batches (:mod:`mixq.dist.profile_shard`); every rank returns the whole table,
    rank 0 writes it.
    """
    from mixq.dist.comm import process_group_from_env
    from mixq.dist.profile_shard import ShardedProfile
    from mixq.model.load import load_model, resolve
    from mixq.pipeline import load_tokenizer
    from mixq.sensitivity.profile import METRICS, profile
    from mixq.sensitivity.validate import validate as validate_table

    cands = parse_candidates(candidates)
    metrics = [m.strip() for m in metrics if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise ValueError(f"expected metrics among {', '.join(METRICS)}, found {', '.join(metrics) or 'none'}")
    check_positive(samples=samples, length=length, batch_size=batch_size, hutchinson_samples=hutchinson_samples,
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
    with process_group_from_env() as comm:
        table = profile(model, cands, batches, kind=kind, metrics=tuple(metrics), keep=tuple(keep),
                        model_name=model_name, hutchinson_samples=hutchinson_samples, seed=seed,
                        progress=progress, hooks=ShardedProfile(comm) if comm.world_size > 1 else None)
        main = comm.is_main
        if comm.world_size > 1:
            table.meta["ranks"] = comm.world_size
    table.meta.update(model=model_name, calibration=calib, samples=samples, length=length,
                      batch_size=batch_size, keep=list(keep), load_seconds=round(load_s, 3))
    if validate:
        per_batch = batch_size if kind == "lm" else 16
        subset = batches[:max(1, -(-validate_samples // per_batch))]
        validate_table(table, model, subset, pairs=validate, seed=seed, progress=progress)
        table.validation["batches"] = len(subset)
    if out is not None and main:
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
class SearchSetup:
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


def build_problem(table: SensitivityTable, metric: str = "fisher", *, budget: float | None = None,
                  candidates: Sequence[str] | None = None, latency: float | None = None,
                  latency_table: str | os.PathLike[str] | None = None, bops: float | None = None,
                  pins: Mapping[str, str] | None = None, tie: bool = True,
                  constraints: str | os.PathLike[str] | None = None) -> SearchSetup:
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
    return SearchSetup(layers, cands, scores, allowed, [list(g) for g in groups], pinned, extra,
                   None if budget_bits is None else float(budget_bits), sum(layer.params for layer in layers))


def bits_constraint(problem: SearchSetup, budget: float) -> Constraint:
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
