"""The ILP against independent oracles (brute force, DP): objective, feasibility, ties, pins, NaN."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mixq.search import Constraint, InfeasibleError, SearchError, solve


def oracle(scores, costs, limits, groups=(), pinned=None, objective=None):
    """Least objective over every per-layer choice meeting the limits (itertools; None if none).

    ``objective``: [L, C] to minimise instead of ``scores`` (used to find the least cost of a constraint);
    a pair is allowed where scores and every cost are finite.
    """
    L, C = scores.shape
    objective = scores if objective is None else objective
    best, best_choice = math.inf, None
    for choice in itertools.product(range(C), repeat=L):
        if any(len({choice[i] for i in g}) > 1 for g in groups):
            continue
        if pinned and any(choice[i] != c for i, c in pinned.items()):
            continue
        if not all(np.isfinite(scores[i, c]) and all(np.isfinite(a[i, c]) for a in costs)
                   for i, c in enumerate(choice)):
            continue
        totals = [sum(a[i, c] for i, c in enumerate(choice)) for a in costs]
        if any(t > lim * (1 + 1e-12) for t, lim in zip(totals, limits)):
            continue
        value = sum(objective[i, c] for i, c in enumerate(choice))
        if value < best:
            best, best_choice = value, choice
    return best, best_choice


def random_case(rng, L=None, C=None, nan=0.15, two=False):
    L = int(rng.integers(1, 6)) if L is None else L
    C = int(rng.integers(1, 5)) if C is None else C
    scores = rng.random((L, C))
    scores[rng.random((L, C)) < nan] = np.nan
    bits = rng.integers(1, 10, (L, C)).astype(float)
    cons = [Constraint("bits", bits, float(rng.integers(L, 8 * L)))]
    if two:
        cons.append(Constraint("latency", rng.random((L, C)), float(rng.random() * L)))
    return scores, cons


def close(a, b):
    return abs(a - b) <= 1e-7 * max(1.0, abs(b))


def check_feasible(sol, scores, cons, groups=(), pinned=None):
    rows = np.arange(scores.shape[0])
    assert np.isfinite(scores[rows, sol.choice]).all()
    for con in cons:
        total = con.costs[rows, sol.choice].sum()
        assert total <= con.limit * (1 + 1e-9)
        assert sol.totals[con.kind] == pytest.approx(total, rel=1e-12)
    assert sol.objective == pytest.approx(scores[rows, sol.choice].sum(), rel=1e-12)
    for g in groups:
        assert len(set(sol.choice[list(g)])) == 1
    for i, c in (pinned or {}).items():
        assert sol.choice[i] == c


@pytest.mark.parametrize("two", [False, True])
def test_milp_and_brute_equal_the_oracle(two):
    rng = np.random.default_rng(1 if two else 0)
    for _ in range(60):
        scores, cons = random_case(rng, two=two)
        best, _ = oracle(scores, [c.costs for c in cons], [c.limit for c in cons])
        for method in ("milp", "brute"):
            if math.isinf(best):
                with pytest.raises(SearchError):
                    solve(scores, cons, method=method)
                continue
            sol = solve(scores, cons, method=method)
            check_feasible(sol, scores, cons)
            assert close(sol.objective, best), (method, sol.objective, best)
            assert sol.optimal and sol.method == method


def test_heuristics_are_feasible_and_no_better_than_the_optimum():
    rng = np.random.default_rng(2)
    for _ in range(60):
        scores, cons = random_case(rng, L=5, C=4)
        best, _ = oracle(scores, [c.costs for c in cons], [c.limit for c in cons])
        for method in ("greedy", "lagrangian"):
            if math.isinf(best):
                with pytest.raises(InfeasibleError):
                    solve(scores, cons, method=method)
                continue
            sol = solve(scores, cons, method=method)
            check_feasible(sol, scores, cons)
            assert sol.objective >= best - 1e-12 and not sol.optimal


def test_groups_pins_and_nan_respected():
    rng = np.random.default_rng(3)
    for trial in range(40):
        scores, cons = random_case(rng, L=6, C=3, nan=0.1)
        groups = [[0, 2], [3, 4, 5]] if trial % 2 else [[1, 3]]
        pinned = {1: int(rng.integers(0, 3))} if trial % 3 == 0 else None
        best, _ = oracle(scores, [c.costs for c in cons], [c.limit for c in cons], groups, pinned)
        allowed_pin = pinned is None or all(np.isfinite(scores[i, c]) for i, c in pinned.items())
        for method in ("milp", "brute", "greedy"):
            if math.isinf(best) or not allowed_pin:
                with pytest.raises(SearchError):
                    solve(scores, cons, groups=groups, pinned=pinned, method=method)
                continue
            sol = solve(scores, cons, groups=groups, pinned=pinned, method=method)
            check_feasible(sol, scores, cons, groups, pinned)
            if method != "greedy":
                assert close(sol.objective, best)


def test_infeasible_reports_the_exact_smallest_budget():
    rng = np.random.default_rng(4)
    seen = 0
    for _ in range(80):
        scores, cons = random_case(rng, L=4, C=3, nan=0.1)
        bits = cons[0].costs
        least, _ = oracle(scores, [bits], [math.inf], objective=bits)
        if math.isinf(least) or least <= cons[0].limit:
            continue
        seen += 1
        per = Constraint("bits", bits, cons[0].limit, per_weight=cons[0].limit / 100)  # "100 weights"
        for method in ("milp", "greedy", "lagrangian", "brute"):
            with pytest.raises(InfeasibleError, match="the smallest feasible is") as info:
                solve(scores, [per], method=method)
            err = info.value
            assert err.kind == "bits" and err.per_weight
            assert err.limit == per.per_weight
            assert err.minimum == pytest.approx(least / 100, rel=1e-12)
        at = solve(scores, [Constraint("bits", bits, err.minimum * 100)])  # exactly the minimum: feasible
        assert at.totals["bits"] == pytest.approx(least)
        with pytest.raises(InfeasibleError):
            solve(scores, [Constraint("bits", bits, least * (1 - 1e-6))])
    assert seen >= 10


def test_infeasible_with_two_constraints():
    rng = np.random.default_rng(5)
    seen = 0
    for _ in range(120):
        scores, cons = random_case(rng, L=4, C=3, nan=0.0, two=True)
        bits, lat = cons[0].costs, cons[1].costs
        feasible, _ = oracle(scores, [bits, lat], [cons[0].limit, cons[1].limit])
        if not math.isinf(feasible):
            continue
        least_bits, _ = oracle(scores, [lat], [cons[1].limit], objective=bits)
        with pytest.raises(InfeasibleError) as info:
            solve(scores, cons)
        err = info.value
        if math.isinf(least_bits):  # the latency limit alone is too small
            least_lat = lat.min(axis=1).sum()
            assert err.kind == "latency" and err.minimum == pytest.approx(least_lat)
        else:
            seen += 1
            assert err.kind == "bits" and err.minimum == pytest.approx(least_bits)
            sol = solve(scores, [Constraint("bits", bits, err.minimum), cons[1]])
            check_feasible(sol, scores, [Constraint("bits", bits, err.minimum * (1 + 1e-12)), cons[1]])
    assert seen >= 5


def knapsack_dp(scores, bits, capacity):
    """Exact least objective of a multiple-choice knapsack with small integer costs (dynamic programming)."""
    capacity = int(capacity)
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    for i in range(scores.shape[0]):
        nxt = np.full(capacity + 1, np.inf)
        for c in range(scores.shape[1]):
            w = int(bits[i, c])
            if w <= capacity:
                nxt[w:] = np.minimum(nxt[w:], best[:capacity + 1 - w] + scores[i, c])
        best = nxt
    return float(best.min())


@pytest.mark.parametrize("seed", [0, 2])
def test_milp_is_exact_on_a_larger_problem(seed):
    """60 layers x 6 candidates, scores spanning 10 decades: the ILP (with bound fixing) equals the DP."""
    rng = np.random.default_rng(seed)
    L, C = 60, 6
    bits = np.sort(rng.integers(2, 17, (L, C)), axis=1).astype(float) * rng.integers(1, 5, (L, 1))
    per_weight = bits / rng.integers(1, 5, (L, 1))
    scores = rng.lognormal(0, 1, (L, 1)) * 4.0 ** (-per_weight) * rng.lognormal(0, .3, (L, C))
    for frac in (0.3, 0.5, 0.7):
        limit = float(bits[:, 0].sum() + frac * (bits[:, -1] - bits[:, 0]).sum())
        cons = [Constraint("bits", bits, limit)]
        best = knapsack_dp(scores, bits, limit)
        sol = solve(scores, cons)
        check_feasible(sol, scores, cons)
        assert sol.optimal and sol.objective == pytest.approx(best, rel=1e-9)
        for method in ("greedy", "lagrangian"):
            heuristic = solve(scores, cons, method=method)
            check_feasible(heuristic, scores, cons)
            assert heuristic.objective >= best * (1 - 1e-12)


def test_no_constraints_picks_each_layers_best():
    scores = np.array([[3.0, 1.0, np.nan], [0.5, 2.0, 0.1]])
    for method in ("milp", "greedy", "lagrangian", "brute"):
        sol = solve(scores, [], method=method)
        assert sol.choice.tolist() == [1, 2] and sol.objective == pytest.approx(1.1) and sol.totals == {}


def test_other_limit_alone_too_small_is_named():
    scores = np.zeros((2, 2))
    bits = np.array([[1.0, 2.0], [1.0, 2.0]])
    lat = np.array([[2.0, 1.0], [2.0, 1.0]])
    msg = r"latency limit 1 s is infeasible.*smallest feasible is 2 s"
    with pytest.raises(InfeasibleError, match=msg) as info:
        solve(scores, [Constraint("bits", bits, 10.0), Constraint("latency", lat, 1.0)])
    assert info.value.kind == "latency" and info.value.minimum == 2.0


def test_message_uses_bits_per_weight():
    scores = np.zeros((2, 2))
    bits = np.array([[325.0, 800.0], [325.0, 800.0]])  # 100 weights per layer
    msg = (r"^budget 2 bits/weight is infeasible with these candidates and constraints; "
           r"the smallest feasible is 3.25 bits/weight$")
    with pytest.raises(InfeasibleError, match=msg):
        solve(scores, [Constraint("bits", bits, 400.0, per_weight=2.0)])


def test_bad_inputs_are_clear_errors():
    scores = np.zeros((3, 2))
    bits = np.ones((3, 2))
    con = [Constraint("bits", bits, 10.0)]
    with pytest.raises(SearchError, match="unknown search method"):
        solve(scores, con, method="annealing")
    with pytest.raises(SearchError, match="differs from scores shape"):
        solve(scores, [Constraint("bits", np.ones((2, 2)), 1.0)])
    with pytest.raises(SearchError, match="unknown constraint kind"):
        Constraint("watts", bits, 1.0)
    with pytest.raises(SearchError, match="out of range"):
        solve(scores, con, pinned={5: 0})
    with pytest.raises(SearchError, match="tied but pinned to different candidates"):
        solve(scores, con, groups=[[0, 1]], pinned={0: 0, 1: 1})
    masked = np.array([[0.0, np.nan], [np.nan, 0.0], [0.0, 0.0]])
    with pytest.raises(SearchError, match=r"tie group of layers \[0, 1\] has no allowed candidate"):
        solve(masked, con, groups=[[0, 1]])
    with pytest.raises(SearchError, match="pinned to candidate 1, which is not allowed"):
        solve(masked, con, pinned={0: 1})
    with pytest.raises(SearchError, match="brute force would enumerate"):
        solve(np.zeros((20, 3)), [], method="brute")


def test_brute_force_with_many_fixed_units_equals_milp():
    rng = np.random.default_rng(8)
    L, C = 40, 3
    scores, bits = rng.random((L, C)), rng.integers(1, 10, (L, C)).astype(float)
    pinned = {i: int(rng.integers(0, C)) for i in range(L) if i % 8}  # 5 free layers: 3**5 combinations
    cons = [Constraint("bits", bits, float(bits.mean(axis=1).sum()))]
    brute = solve(scores, cons, pinned=pinned, method="brute")
    exact = solve(scores, cons, pinned=pinned)
    check_feasible(brute, scores, cons, pinned=pinned)
    assert brute.choice.tolist() == exact.choice.tolist() and close(brute.objective, exact.objective)


def test_native_stdout_is_silenced_only_inside(capfd):
    """HiGHS's stray C printf goes to file descriptor 1: dropped inside the guard, kept outside."""
    import ctypes
    import os

    from mixq.search.ilp import _native_stdout_silenced

    libc = ctypes.CDLL(None)
    with _native_stdout_silenced():
        os.write(1, b"raw write\n")
        libc.printf(b"c printf\n")
    libc.printf(b"after\n")
    libc.fflush(None)
    out = capfd.readouterr().out
    assert out == "after\n"
