"""The exact solver: a binary ILP solved by HiGHS (``scipy.optimize.milp``), after reduced-cost fixing.

A cheap feasible choice (from a heuristic) and the Lagrangian bound of the first limit remove every
(unit, candidate) pair that cannot be in an optimal choice; HiGHS then proves optimality on what is left,
which is both much faster and numerically cleaner than the full problem.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix, vstack

from mixq.search.errors import SearchError
from mixq.search.problem import Problem

MIP_REL_GAP = 1e-9
"""HiGHS relative gap at which a MILP counts as solved (on the objective shifted so each unit's best is 0)."""


def milp_choice(p: Problem, time_limit: float) -> tuple[np.ndarray | None, bool]:
    """(choice or None when infeasible, proven optimal). Binary x[u, c] over allowed pairs, one-hot rows,
    one row per limit. Each limit row is divided by its least nonzero cost and the objective (shifted so
    each unit's best is 0) by its largest value: HiGHS works fastest and cleanest on O(1) coefficients."""
    U, _ = p.allowed.shape
    ui, ci = np.nonzero(p.allowed)  # row-major: variables grouped by unit
    V = ui.size
    obj = p.objective[ui, ci] - p.masked(p.objective).min(axis=1)[ui]  # shift: each unit's best is 0
    obj_scale = float(np.max(np.abs(obj))) if V else 1.0
    c = obj / (obj_scale if obj_scale > 0 else 1.0)
    rows = [csr_matrix((np.ones(V), (ui, np.arange(V))), shape=(U, V))]
    lower, upper = [np.ones(U)], [np.ones(U)]
    limits = p.limits.astype(np.float64).copy()
    for _ in range(3):
        ub_rows, ub = [], []
        for k in range(limits.size):
            coef = p.costs[k, ui, ci]
            nonzero = np.abs(coef[coef != 0])
            scale = float(nonzero.min()) if nonzero.size else 1.0  # least nonzero cost becomes 1
            ub_rows.append(csr_matrix(coef[None, :] / scale))
            ub.append(limits[k] / scale)
        A = vstack(rows + ub_rows, format="csr")
        lb = np.concatenate(lower + [np.full(len(ub), -np.inf)])
        ubs = np.concatenate(upper + [np.asarray(ub, dtype=np.float64)])
        with _native_stdout_silenced():
            res = milp(c, integrality=np.ones(V), bounds=Bounds(0, 1),
                       constraints=LinearConstraint(A, lb, ubs),
                       options={"time_limit": float(time_limit), "disp": False, "mip_rel_gap": MIP_REL_GAP})
        if res.status == 2:
            return None, False
        if res.x is None:
            if res.status == 1:
                raise SearchError(f"the ILP found no feasible choice within the time limit of "
                                  f"{time_limit:g} s; "
                                  "raise time_limit or use method greedy")
            raise SearchError(f"the ILP solver failed: {res.message}")
        X = np.full(p.allowed.shape, -1.0)
        X[ui, ci] = res.x
        choice = np.argmax(X, axis=1).astype(np.int64)
        excess = p.totals(choice) - p.limits
        if np.all(excess <= p.tolerance):
            return choice, res.status == 0
        # HiGHS accepted a row within its own tolerance: tighten the offending limits and solve again
        limits = np.where(excess > p.tolerance, limits - 2 * excess, limits)
    raise SearchError("the ILP solution exceeds a limit by more than the floating-point tolerance "
                      "after 3 tries")


def lagrangian_bound(p: Problem) -> tuple[float, np.ndarray]:
    """(bound, per-pair bound): the Lagrangian dual bound of the first limit (others relaxed), maximised over
    λ ≥ 0 by bisection on its subgradient, and ``[U, C]`` the bound on every choice that takes pair (u, c)."""
    A, B = p.costs[0], float(p.limits[0])

    def dual(lam: float) -> tuple[float, np.ndarray, float]:
        reduced = p.masked(p.objective + lam * A)  # [U, C]
        best = reduced.min(axis=1)
        used = float(A[np.arange(best.size), np.argmin(reduced, axis=1)].sum())
        return float(best.sum()) - lam * B, reduced - best[:, None], used - B

    value, slack, grad = dual(0.0)
    if grad > 0:  # the budget binds: find λ where the subgradient changes sign
        obj_range = float(np.ptp(np.where(p.allowed, p.objective, 0.0)))
        cost_range = float(np.ptp(np.where(p.allowed, A, 0.0))) or 1.0
        lo, hi = 0.0, max(obj_range, 1e-300) / cost_range
        for _ in range(64):
            if dual(hi)[2] <= 0:
                break
            lo, hi = hi, 2.0 * hi
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi:
                break
            lo, hi = (mid, hi) if dual(mid)[2] > 0 else (lo, mid)
        value, slack, _ = max((dual(lo), dual(hi)), key=lambda d: d[0])
    return value, value + slack


def fix_by_bound(p: Problem, incumbent: np.ndarray) -> Problem:
    """Reduced-cost fixing: drop every pair whose Lagrangian bound exceeds the objective of a feasible
    ``incumbent``. No optimal choice uses such a pair, so the smaller problem has the same optimum."""
    if p.limits.size == 0:
        return p
    best = float(p.objective[np.arange(incumbent.size), incumbent].sum())
    _, pair_bound = lagrangian_bound(p)
    scale = np.abs(best) + np.abs(p.masked(p.objective)).max(axis=1, where=p.allowed, initial=0.0).sum()
    keep = p.allowed & (pair_bound <= best + 1e-9 * scale)
    keep[np.arange(incumbent.size), incumbent] = True
    return Problem(p.objective, p.costs, p.limits, keep)


@contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to the null device while HiGHS runs, restoring it (and flushing C stdio) after.

    HiGHS 1.12 (bundled with scipy 1.17) prints a stray debug line
    (``HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();``) with C ``printf`` even
    when ``disp`` is False; without this it would land in the middle of a command's JSON output.
    """
    flush = _c_fflush()
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        flush()
        os.dup2(null, 1)
        yield
    finally:
        flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _c_fflush() -> Callable[[], None]:
    """``fflush(NULL)`` of the C library when it can be reached (POSIX), else a no-op."""
    try:
        libc = ctypes.CDLL(None)
        fflush = libc.fflush
    except (OSError, AttributeError, TypeError):
        return lambda: None
    fflush.argtypes = [ctypes.c_void_p]

    def flush() -> None:
        fflush(None)

    return flush
