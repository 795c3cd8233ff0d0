"""Heuristic solvers (greedy, Lagrangian) and brute force (the exact oracle for tiny problems)."""

from __future__ import annotations

import math

import numpy as np

from mixq.search.errors import SearchError
from mixq.search.problem import Problem

BRUTE_MAX = 200_000
"""Largest number of combinations brute force enumerates."""


def _cheapest_start(p: Problem) -> np.ndarray:
    """Per unit the candidate of least first cost (ties: least objective); no limits → least objective."""
    if p.limits.size == 0:
        return np.argmin(p.masked(p.objective), axis=1)
    cost0 = p.masked(p.costs[0])
    best = cost0.min(axis=1, keepdims=True)
    near = cost0 <= best + 1e-12 * np.abs(best)
    return np.argmin(np.where(near, p.objective, np.inf), axis=1)


def greedy_fill(p: Problem, choice: np.ndarray) -> np.ndarray:
    """Repeatedly take the upgrade of best (objective decrease / first-cost increase) that keeps every limit
    (upgrades that do not raise the first cost first, largest decrease first)."""
    choice = choice.copy()
    U = choice.size
    units = np.arange(U)
    while True:
        current = p.objective[units, choice]
        gain = np.where(p.allowed, current[:, None] - p.objective, -np.inf)  # [U, C] objective decrease
        ok = gain > 0
        if not ok.any():
            return choice
        if p.limits.size:
            delta = p.costs - p.costs[:, units, choice][:, :, None]  # [K, U, C]
            room = (p.limits + p.tolerance - p.totals(choice))[:, None, None]
            ok &= np.all(delta <= room, axis=0)
            if not ok.any():
                return choice
            extra = delta[0]
        else:
            extra = np.zeros_like(gain)
        free = ok & (extra <= 0)
        if free.any():
            flat = np.argmax(np.where(free, gain, -np.inf))
        else:
            flat = np.argmax(np.where(ok, gain / np.where(extra > 0, extra, 1.0), -np.inf))
        u, c = divmod(int(flat), p.allowed.shape[1])
        choice[u] = c


def greedy_choice(p: Problem) -> np.ndarray | None:
    """Start at the cheapest candidates by the first cost (if that breaks another limit: by the sum of
    each cost over its limit), then :func:`greedy_fill`."""
    start = _cheapest_start(p)
    if not p.feasible(start) and p.limits.size > 1:  # cheapest by the first cost breaks another limit:
        scale = np.where(p.limits > 0, p.limits, 1.0)[:, None, None]  # start at the least summed share
        start = np.argmin(p.masked((p.costs / scale).sum(axis=0)), axis=1)
    return greedy_fill(p, start) if p.feasible(start) else None


def lagrangian_choice(p: Problem) -> np.ndarray | None:
    """Bisection on λ ≥ 0 for the least λ whose per-unit argmin of objective + λ·first cost is feasible,
    then :func:`greedy_fill` spends what is left of the limits."""
    def pick(lam: float) -> np.ndarray:
        if p.limits.size == 0:
            return np.argmin(p.masked(p.objective), axis=1)
        return np.argmin(p.masked(p.objective + lam * p.costs[0]), axis=1)

    choice = pick(0.0)
    if p.feasible(choice) or p.limits.size == 0:
        return greedy_fill(p, choice)
    cheapest = _cheapest_start(p)
    if not p.feasible(cheapest):  # the first limit is not the binding one: greedy's second start
        return greedy_choice(p)
    obj_range = float(np.ptp(np.where(p.allowed, p.objective, 0.0)))
    cost_range = float(np.ptp(np.where(p.allowed, p.costs[0], 0.0))) or 1.0
    lo, hi = 0.0, max(obj_range, 1e-300) / cost_range
    best = cheapest  # λ → ∞ picks the cheapest candidates
    for _ in range(64):  # doubling until feasible; past 2**64 × the natural scale, keep the cheapest
        if p.feasible(pick(hi)):
            best = pick(hi)
            break
        lo, hi = hi, hi * 2.0
    else:
        return greedy_fill(p, best)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        trial = pick(mid)
        if p.feasible(trial):
            hi, best = mid, trial
        else:
            lo = mid
    return greedy_fill(p, best)


def brute_choice(p: Problem) -> np.ndarray | None:
    """Enumerate every combination of allowed candidates (at most :data:`BRUTE_MAX`); the feasible one of
    least objective (ties: the first in mixed-radix order). Units with one allowed candidate stay fixed."""
    options = [np.flatnonzero(row) for row in p.allowed]
    count = math.prod(len(o) for o in options)
    if count > BRUTE_MAX:
        raise SearchError(f"brute force would enumerate {count} combinations; at most {BRUTE_MAX} allowed "
                          "(use method milp)")
    choice = np.array([o[0] for o in options], dtype=np.int64)
    free = [u for u, o in enumerate(options) if len(o) > 1]
    fixed = p.objective[np.arange(choice.size), choice].sum(), p.totals(choice)
    index = np.arange(count)
    chosen = np.empty((len(free), count), dtype=np.int64)  # [free units, combinations]
    stride = 1
    for row in range(len(free) - 1, -1, -1):
        o = options[free[row]]
        chosen[row] = o[(index // stride) % len(o)]
        stride *= len(o)
    units = np.array(free, dtype=np.int64)[:, None]
    base = choice[units]  # [free, 1]: what the fixed totals counted for the free units
    total_obj = fixed[0] + (p.objective[units, chosen] - p.objective[units, base]).sum(axis=0)  # [count]
    ok = np.ones(count, dtype=bool)
    for k in range(p.limits.size):
        total = fixed[1][k] + (p.costs[k][units, chosen] - p.costs[k][units, base]).sum(axis=0)
        ok &= total <= p.limits[k] + p.tolerance[k]
    if not ok.any():
        return None
    choice[free] = chosen[:, int(np.argmin(np.where(ok, total_obj, np.inf)))]
    return choice
