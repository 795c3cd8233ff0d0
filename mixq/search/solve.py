"""Choose one candidate per layer: least summed score under summed-cost limits (multiple-choice knapsack).

``solve`` merges tie groups into units, applies pins and masks (NaN/inf score or NaN cost = not allowed),
then runs the exact ILP (scipy's HiGHS ``milp``) or a heuristic. When no choice meets the limits it raises
:class:`InfeasibleError` with the smallest feasible value of the first constraint.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mixq.search.costs import COST_KINDS
from mixq.search.errors import InfeasibleError, SearchError
from mixq.search.heuristics import brute_choice, greedy_choice, lagrangian_choice
from mixq.search.ilp import fix_by_bound, milp_choice
from mixq.search.problem import Problem

METHODS = ("milp", "greedy", "lagrangian", "brute")


@dataclass(frozen=True, eq=False)
class Constraint:
    """Summed ``costs`` [L, C] of the choice must be ≤ ``limit`` (absolute). ``per_weight``: the same limit
    as the user gave it per weight (e.g. 4.25 bits/weight), used in messages; None when given absolute."""

    kind: str
    costs: np.ndarray
    limit: float
    per_weight: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in COST_KINDS:
            raise SearchError(f"unknown constraint kind {self.kind!r}; expected one of "
                              f"{', '.join(COST_KINDS)}")
        if np.ndim(self.costs) != 2:
            raise SearchError(f"constraint {self.kind}: expected costs [layers, candidates], found shape "
                              f"{list(np.shape(self.costs))}")
        if not np.isfinite(self.limit):
            raise SearchError(f"constraint {self.kind}: expected a finite limit, found {self.limit}")

    def as_given(self, total: float) -> float:
        """``total`` (absolute) in the units the limit was given in (per weight or absolute)."""
        if self.per_weight is None or self.limit == 0:
            return total
        return total * self.per_weight / self.limit


@dataclass(frozen=True, eq=False)
class Solution:
    """``choice`` [L] int64 candidate index per layer; ``objective``: summed score; ``totals``: kind → summed
    cost; ``optimal``: proven optimal (HiGHS status 0, or brute force); ``method``; ``seconds``."""

    choice: np.ndarray
    objective: float
    totals: dict[str, float]
    optimal: bool
    method: str
    seconds: float


def solve(scores: np.ndarray, constraints: Sequence[Constraint], *, groups: Sequence[Sequence[int]] = (),
          pinned: Mapping[int, int] | None = None, method: str = "milp",
          time_limit: float = 30.0) -> Solution:
    """Least ``sum scores[l, choice[l]]`` subject to ``sum costs[l, choice[l]] <= limit`` for each constraint.

    ``scores`` [L, C] float (NaN/inf: not allowed). ``groups``: layer-index lists that must share one
    candidate (overlapping groups merge). ``pinned``: layer → candidate index. ``method``: milp | greedy |
    lagrangian | brute. Raises InfeasibleError (budget too small) or SearchError (bad input).
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise SearchError(f"unknown search method {method!r}; expected one of {', '.join(METHODS)}")
    if time_limit <= 0:
        raise SearchError(f"expected a positive time limit, found {time_limit}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise SearchError(f"expected scores [layers, candidates] with both > 0, found shape "
                          f"{list(scores.shape)}")
    for con in constraints:
        if np.shape(con.costs) != scores.shape:
            raise SearchError(f"constraint {con.kind}: costs shape {list(np.shape(con.costs))} differs from "
                              f"scores shape {list(scores.shape)}")
    unit_of, members = _units(scores.shape[0], groups)
    problem = _problem(scores, constraints, unit_of, members, dict(pinned or {}))
    if method == "milp":
        choice, optimal = _exact(problem, time_limit)
    elif method == "brute":
        choice, optimal = brute_choice(problem), True
    elif method == "greedy":
        choice, optimal = greedy_choice(problem), False
    else:
        choice, optimal = lagrangian_choice(problem), False
    if choice is None:
        _raise_infeasible(problem, constraints, method, time_limit)
    if not problem.allowed[np.arange(choice.size), choice].all():
        raise SearchError(f"internal error: method {method} chose a candidate that is not allowed")
    per_layer = choice[unit_of]
    rows = np.arange(scores.shape[0])
    totals = {con.kind: float(np.asarray(con.costs, dtype=np.float64)[rows, per_layer].sum())
              for con in constraints}
    return Solution(per_layer.astype(np.int64), float(scores[rows, per_layer].sum()), totals, bool(optimal),
                    method, time.perf_counter() - t0)


def _units(n_layers: int, groups: Sequence[Sequence[int]]) -> tuple[np.ndarray, list[list[int]]]:
    """``unit_of`` [L] and each unit's layers; overlapping groups are merged (union-find)."""
    parent = list(range(n_layers))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in groups:
        idx = [int(i) for i in group]
        bad = [i for i in idx if not 0 <= i < n_layers]
        if bad:
            raise SearchError(f"tie group {idx}: layer index {bad[0]} is out of range (0..{n_layers - 1})")
        for i in idx[1:]:
            parent[root(i)] = root(idx[0])
    roots = [root(i) for i in range(n_layers)]
    order = {r: u for u, r in enumerate(dict.fromkeys(roots))}
    unit_of = np.array([order[r] for r in roots], dtype=np.int64)
    members: list[list[int]] = [[] for _ in order]
    for i, u in enumerate(unit_of):
        members[u].append(i)
    return unit_of, members


def _problem(scores: np.ndarray, constraints: Sequence[Constraint], unit_of: np.ndarray,
             members: list[list[int]], pinned: dict[int, int]) -> Problem:
    """Merge layers into units (sums), mask what is not allowed, apply pins."""
    L, C = scores.shape
    U = len(members)
    costs = np.stack([np.asarray(con.costs, dtype=np.float64) for con in constraints]) if constraints \
        else np.zeros((0, L, C))
    allowed_layer = np.isfinite(scores) & np.all(np.isfinite(costs), axis=0)
    allowed = np.ones((U, C), dtype=bool)
    np.logical_and.at(allowed, unit_of, allowed_layer)
    objective = np.zeros((U, C))
    np.add.at(objective, unit_of, np.where(allowed_layer, scores, 0.0))
    unit_costs = np.zeros((len(constraints), U, C))
    for k in range(len(constraints)):
        np.add.at(unit_costs[k], unit_of, np.where(allowed_layer, costs[k], 0.0))
    pin_of_unit: dict[int, tuple[int, int]] = {}
    for layer, cand in pinned.items():
        layer, cand = int(layer), int(cand)
        if not 0 <= layer < L:
            raise SearchError(f"pin on layer index {layer}: out of range (0..{L - 1})")
        if not 0 <= cand < C:
            raise SearchError(f"pin on layer {layer}: candidate index {cand} out of range (0..{C - 1})")
        if not allowed_layer[layer, cand]:
            raise SearchError(f"layer {layer} is pinned to candidate {cand}, which is not allowed there "
                              "(no score or cost: the candidate does not apply or was masked)")
        u = int(unit_of[layer])
        if u in pin_of_unit and pin_of_unit[u][1] != cand:
            other, other_cand = pin_of_unit[u]
            raise SearchError(f"layers {other} and {layer} are tied but pinned to different candidates "
                              f"({other_cand} and {cand})")
        pin_of_unit[u] = (layer, cand)
    for u, (_, cand) in pin_of_unit.items():
        keep = allowed[u, cand]
        allowed[u] = False
        allowed[u, cand] = keep
    for u in np.flatnonzero(~allowed.any(axis=1)):
        layers = members[int(u)]
        what = f"layer {layers[0]}" if len(layers) == 1 else f"tie group of layers {layers}"
        raise SearchError(f"{what} has no allowed candidate (every candidate has no score or does not apply"
                          f"{' to all its layers' if len(layers) > 1 else ''})")
    return Problem(objective, unit_costs, np.array([float(c.limit) for c in constraints]), allowed)


def _raise_infeasible(p: Problem, constraints: Sequence[Constraint], method: str, time_limit: float) -> None:
    """Raise InfeasibleError for the first constraint with its smallest feasible value (subject to the other
    constraints, pins and ties); when the others alone admit nothing, name the one that is too tight."""
    if not constraints:
        raise SearchError("no choice found, and there is no constraint to relax")
    first = constraints[0]
    separable_min = p.masked(p.costs).min(axis=2).sum(axis=1)  # [K] each limit's least total on its own
    for k, con in enumerate(constraints[1:], start=1):
        if separable_min[k] > p.limits[k] + p.tolerance[k]:
            raise InfeasibleError(con.kind, _given(con), con.as_given(float(separable_min[k])),
                                  per_weight=con.per_weight is not None,
                                  detail=f"even without the {first.kind} limit")
    if len(constraints) == 1:
        minimum = float(separable_min[0])
    else:
        rest = Problem(p.costs[0], p.costs[1:], p.limits[1:], p.allowed)
        choice, _ = _exact(rest, time_limit)
        if choice is None:
            kinds = " and ".join(c.kind for c in constraints[1:])
            raise InfeasibleError(constraints[1].kind, _given(constraints[1]), None,
                                  per_weight=constraints[1].per_weight is not None,
                                  detail=f"the {kinds} limits together admit no choice, "
                                         f"even without the {first.kind} limit")
        minimum = float(p.costs[0][np.arange(choice.size), choice].sum())
    if minimum <= p.limits[0] + p.tolerance[0]:
        raise SearchError(f"method {method} found no choice within the limits, but one exists (least "
                          f"{first.kind} {first.as_given(minimum):.6g}); use method milp")
    raise InfeasibleError(first.kind, _given(first), first.as_given(minimum),
                          per_weight=first.per_weight is not None)


def _given(con: Constraint) -> float:
    """The limit as the user gave it."""
    return con.per_weight if con.per_weight is not None else con.limit


def _exact(p: Problem, time_limit: float) -> tuple[np.ndarray | None, bool]:
    """The ILP, after a heuristic choice and the Lagrangian bound have dropped the pairs no optimum uses."""
    start = lagrangian_choice(p)
    choice, optimal = milp_choice(fix_by_bound(p, start) if start is not None else p, time_limit)
    if choice is not None and start is not None and not optimal and \
            _objective(p, start) < _objective(p, choice):
        choice = start  # HiGHS stopped at the time limit with a worse choice than the heuristic's
    return choice, optimal


def _objective(p: Problem, choice: np.ndarray) -> float:
    return float(p.objective[np.arange(choice.size), choice].sum())
