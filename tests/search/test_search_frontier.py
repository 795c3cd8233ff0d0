"""Frontier sweeps, uniform points and the Pareto filter (against a brute-force filter)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mixq.plan import parse_candidates
from mixq.search import (
    FrontierPoint,
    InfeasibleError,
    SearchError,
    bits_per_weight,
    cost_matrix,
    pareto,
    sweep,
    uniform_points,
)
from mixq.sensitivity.table import LayerInfo

CANDS = parse_candidates("int4:g32,int4:g128,mxfp4,int8:channel,keep")


def setup(seed=0):
    shapes = [(64, 128), (32, 64), (64, 128), (128, 64), (64, 256), (32, 128)]
    layers = [LayerInfo(f"model.layers.{i // 3}.mlp.p{i % 3}", s, s[0] * s[1]) for i, s in enumerate(shapes)]
    bits = cost_matrix(layers, CANDS, "bits")
    bpw = bits / np.array([layer.params for layer in layers])[:, None]
    rng = np.random.default_rng(seed)
    scores = rng.lognormal(0, 1, (len(layers), 1)) * 4.0 ** (-bpw)
    scores[:, -1] = 0.0
    scores[np.isnan(bits)] = np.nan
    return layers, scores


def test_uniform_points_skip_candidates_that_do_not_apply_everywhere():
    layers, scores = setup()
    points, notes = uniform_points(scores, layers, CANDS)
    assert [p.label for p in points] == ["int4:g32", "mxfp4", "int8:channel", "keep"]
    assert len(notes) == 1 and "int4:g128" in notes[0] and "model.layers.0.mlp.p1" in notes[0]
    for p in points:
        j = [c.name for c in CANDS].index(p.label)
        assert (p.choice == j).all() and p.budget is None and p.solution is None
        assert p.predicted == pytest.approx(scores[:, j].sum())
        assert p.bits_per_weight == pytest.approx(bits_per_weight(layers, CANDS, p.choice))
    assert points[-1].bits_per_weight == 16.0


def test_sweep_meets_each_budget_and_improves_with_bits():
    layers, scores = setup()
    budgets = [4.5, 5.0, 6.0, 8.0, 12.0]
    points, notes = sweep(scores, layers, CANDS, budgets)
    assert notes == [] and [p.label for p in points] == [f"searched@{b:g}" for b in budgets]
    for p, b in zip(points, budgets):
        assert p.budget == b and p.bits_per_weight <= b * (1 + 1e-12)
        assert p.solution.optimal and p.predicted == pytest.approx(p.solution.objective)
    predicted = [p.predicted for p in points]
    assert all(a >= b for a, b in itertools.pairwise(predicted))
    # a searched point is never worse than a uniform point that fits the same budget
    for u in uniform_points(scores, layers, CANDS)[0]:
        for p in points:
            if u.bits_per_weight <= p.budget:
                assert p.predicted <= u.predicted + 1e-15


def test_sweep_infeasible_budgets_become_notes_or_the_smallest_error():
    layers, scores = setup()
    points, notes = sweep(scores, layers, CANDS, [2.0, 5.0])
    assert [p.budget for p in points] == [5.0]
    assert len(notes) == 1 and notes[0].startswith("searched@2: budget 2 bits/weight is infeasible")
    with pytest.raises(InfeasibleError) as info:
        sweep(scores, layers, CANDS, [3.0, 2.0])
    assert info.value.limit == 2.0 and info.value.minimum == pytest.approx(
        uniform_points(scores, layers, CANDS)[0][1].bits_per_weight)  # all mxfp4 (4.25) is the least
    with pytest.raises(SearchError, match="at least one"):
        sweep(scores, layers, CANDS, [])


def test_sweep_allowed_masks_candidates():
    layers, scores = setup()
    ints = [j for j, c in enumerate(CANDS) if c.family == "int"]
    points, _ = sweep(scores, layers, CANDS, [5.0, 9.0], allowed=ints)
    for p in points:
        assert set(p.choice.tolist()) <= set(ints)
    bits = cost_matrix(layers, CANDS, "bits")[:, ints]
    least = np.nanmin(bits, axis=1).sum() / sum(layer.params for layer in layers)  # int4:g128 where it fits
    assert 4.125 < least < 4.5
    with pytest.raises(InfeasibleError) as info:  # mxfp4 (4.25) would fit, but it is not an integer format
        sweep(scores, layers, CANDS, [4.3], allowed=ints)
    assert info.value.minimum == pytest.approx(least, rel=1e-12)


def pareto_brute(points, key):
    kept = []
    for i, p in enumerate(points):
        kp = key(p)
        if np.isnan(kp):
            continue
        others = [q for q in points if not np.isnan(key(q))]
        dominated = any(q.bits_per_weight <= p.bits_per_weight and key(q) <= kp and
                        (q.bits_per_weight < p.bits_per_weight or key(q) < kp) for q in others)
        duplicate = any(q.bits_per_weight == p.bits_per_weight and key(q) == kp for q in points[:i])
        if not dominated and not duplicate:
            kept.append(p)
    return sorted(kept, key=lambda p: p.bits_per_weight)


def test_pareto_equals_a_brute_filter():
    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        bits = rng.integers(3, 9, n).astype(float)  # small integer grids make ties common
        pred = rng.integers(0, 5, n).astype(float)
        if rng.random() < 0.3:
            pred[0] = np.nan
        points = [FrontierPoint(None, f"p{i}", np.zeros(1, dtype=np.int64), bits[i], pred[i], None)
                  for i in range(n)]
        got = pareto(points)
        assert [p.label for p in got] == [p.label for p in pareto_brute(points, lambda p: p.predicted)]
    # another key (e.g. a measured perplexity)
    pts = [FrontierPoint(None, "a", np.zeros(1), 4.0, 1.0, None),
           FrontierPoint(None, "b", np.zeros(1), 5.0, 0.5, None)]
    assert [p.label for p in pareto(pts, key=lambda p: -p.predicted)] == ["a"]
