"""Frontiers: the best predicted degradation at each bits/weight budget, next to the uniform choices.

A sweep solves the search once per budget (bits per weight over the profiled layers, every scale
counted); uniform points give every layer the same candidate. :func:`pareto` keeps the points no other
point beats on both bits and the chosen key (predicted score, or a measured perplexity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mixq.plan.candidates import Candidate
from mixq.search.costs import bits_per_weight, cost_matrix
from mixq.search.errors import InfeasibleError, SearchError
from mixq.search.solve import Constraint, Solution, solve

if TYPE_CHECKING:
    from mixq.sensitivity.table import LayerInfo


@dataclass(frozen=True, eq=False)
class FrontierPoint:
    """One point: ``choice`` [L] candidate indices, achieved ``bits_per_weight`` (every scale counted, over
    the profiled layers), ``predicted`` summed score; ``budget``/``solution`` None for uniform points."""

    budget: float | None
    label: str
    choice: np.ndarray
    bits_per_weight: float
    predicted: float
    solution: Solution | None


def _check(scores: np.ndarray, layers: Sequence[LayerInfo], candidates: Sequence[Candidate]) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(layers), len(candidates)):
        raise SearchError(f"expected scores [{len(layers)} layers, {len(candidates)} candidates], found "
                          f"shape {list(scores.shape)}")
    return scores


def uniform_points(scores: np.ndarray, layers: Sequence[LayerInfo], candidates: Sequence[Candidate]
                   ) -> tuple[list[FrontierPoint], list[str]]:
    """One point per candidate whose score is finite on every layer; notes name the others."""
    scores = _check(scores, layers, candidates)
    points: list[FrontierPoint] = []
    notes: list[str] = []
    for j, cand in enumerate(candidates):
        missing = np.flatnonzero(~np.isfinite(scores[:, j]))
        if missing.size:
            notes.append(f"uniform {cand.name}: left out, it does not apply to {missing.size} of "
                         f"{len(layers)} "
                         f"layers (first: {layers[int(missing[0])].name})")
            continue
        choice = np.full(len(layers), j, dtype=np.int64)
        points.append(FrontierPoint(None, cand.name, choice, bits_per_weight(layers, candidates, choice),
                                    float(scores[:, j].sum()), None))
    return points, notes


def sweep(scores: np.ndarray, layers: Sequence[LayerInfo], candidates: Sequence[Candidate],
          budgets: Sequence[float], *, extra: Sequence[Constraint] = (), groups: Sequence[Sequence[int]] = (),
          pinned: Mapping[int, int] | None = None, method: str = "milp", time_limit: float = 30.0,
          allowed: Sequence[int] | None = None) -> tuple[list[FrontierPoint], list[str]]:
    """One searched point per budget (bits/weight over the profiled layers), labelled ``searched@B``.

    ``extra``: further constraints (latency, BOPs). ``allowed``: candidate indices that may be used
    (the others are masked). An infeasible budget becomes a note; when every budget is infeasible the
    InfeasibleError of the smallest budget is raised.
    """
    scores = _check(scores, layers, candidates).copy()
    if not budgets:
        raise SearchError("expected at least one bits/weight budget, found none")
    if allowed is not None:
        keep = np.zeros(len(candidates), dtype=bool)
        for j in allowed:
            if not 0 <= int(j) < len(candidates):
                raise SearchError(f"allowed candidate index {j} out of range (0..{len(candidates) - 1})")
            keep[int(j)] = True
        scores[:, ~keep] = np.nan
    bits = cost_matrix(layers, candidates, "bits")
    params = float(sum(layer.params for layer in layers))
    points: list[FrontierPoint] = []
    notes: list[str] = []
    errors: list[tuple[float, InfeasibleError]] = []
    for budget in budgets:
        budget = float(budget)
        if not math.isfinite(budget) or budget <= 0:
            raise SearchError(f"expected positive bits/weight budgets, found {budget}")
        constraints = [Constraint("bits", bits, budget * params, per_weight=budget), *extra]
        try:
            sol = solve(scores, constraints, groups=groups, pinned=pinned, method=method,
                        time_limit=time_limit)
        except InfeasibleError as err:
            errors.append((budget, err))
            notes.append(f"searched@{budget:g}: {err}")
            continue
        if not sol.optimal and method in ("milp", "brute"):
            notes.append(f"searched@{budget:g}: stopped at the time limit ({time_limit:g} s), "
                         "not proven optimal")
        points.append(FrontierPoint(budget, f"searched@{budget:g}", sol.choice,
                                    bits_per_weight(layers, candidates, sol.choice), sol.objective, sol))
    if not points:
        raise min(errors, key=lambda e: e[0])[1]
    return points, notes


def pareto(points: Sequence[FrontierPoint], key: Callable[[FrontierPoint], float] = lambda p: p.predicted
           ) -> list[FrontierPoint]:
    """Points that no other point beats (no more bits and no higher key, one strictly less), sorted by bits.

    Of exact ties (same bits and key) the first given is kept; points whose key is NaN are left out.
    """
    scored = [(p.bits_per_weight, float(key(p)), i, p) for i, p in enumerate(points)]
    scored = [s for s in scored if not math.isnan(s[1])]
    scored.sort(key=lambda s: (s[0], s[1], s[2]))
    out: list[FrontierPoint] = []
    best = math.inf
    for _bits, value, _i, point in scored:
        if value < best:
            out.append(point)
            best = value
    return out
