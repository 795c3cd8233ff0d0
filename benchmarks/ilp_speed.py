"""ilp-speed: how fast the mixed-precision ILP solves, and how far the heuristics land from its optimum.

Synthetic but realistic: 200 linear layers cycling through the 7 weight shapes of a SmolLM2-360M
block (q, k, v, o, gate, up, down), 8 candidates from 3.5 to 16 bits/weight (true bit costs, every scale
counted, from ``cost_matrix``), scores lognormal per layer and decreasing with bits (~ 4^-bits, lognormal
noise per pair, keep = 0). For each budget from 3.5 (the least: int3:g64 everywhere) to 6 bits/weight,
without and with q/k/v and gate/up tie groups: MILP seconds (median of ``--repeats``), whether HiGHS
proved optimality, and the relative objective gap of greedy and Lagrangian to the MILP optimum; for
reference, one run of the plain MILP (HiGHS on the full problem, without the bound fixing that ``solve``
does first) with its seconds and gap. Run
single-threaded (``OMP_NUM_THREADS=1``) for comparable numbers::

    OMP_NUM_THREADS=1 python benchmarks/ilp_speed.py [--layers 200] [--repeats 5] [--seed 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import scipy

from mixq.plan import parse_candidates
from mixq.search import Constraint, cost_matrix, solve, tie_groups
from mixq.search.ilp import milp_choice
from mixq.search.solve import _problem, _units
from mixq.sensitivity.table import LayerInfo

CANDIDATES = "int3:g64:mse,int4:g64:mse,int4:g32:mse,mxfp4,nvfp4,int8:channel,fp8_e4m3:channel,keep"
BLOCK = [("self_attn.q_proj", (960, 960), "input_layernorm"),
         ("self_attn.k_proj", (320, 960), "input_layernorm"),
         ("self_attn.v_proj", (320, 960), "input_layernorm"), ("self_attn.o_proj", (960, 960), None),
         ("mlp.gate_proj", (2560, 960), "post_attention_layernorm"),
         ("mlp.up_proj", (2560, 960), "post_attention_layernorm"), ("mlp.down_proj", (960, 2560), None)]


def make_layers(n: int) -> list[LayerInfo]:
    out = []
    for i in range(n):
        block, (name, shape, group) = divmod(i, len(BLOCK))[0], BLOCK[i % len(BLOCK)]
        out.append(LayerInfo(f"model.layers.{block}.{name}", shape, shape[0] * shape[1],
                             f"model.layers.{block}.{group}" if group else None))
    return out


def make_scores(bpw: np.ndarray, is_keep: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[L, C]: layer sensitivity (lognormal, sigma 1.5) × 4^-bits × pair noise (lognormal, sigma 0.3)."""
    L, C = bpw.shape
    layer = rng.lognormal(0.0, 1.5, size=(L, 1))
    scores = layer * 4.0 ** (-bpw) * rng.lognormal(0.0, 0.3, size=(L, C))
    scores[:, is_keep] = 0.0
    return scores


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "ilp-speed.json"))
    args = ap.parse_args()
    cands = parse_candidates(CANDIDATES)
    layers = make_layers(args.layers)
    bits = cost_matrix(layers, cands, "bits")
    params = np.array([layer.params for layer in layers], dtype=np.float64)
    bpw = bits / params[:, None]
    scores = make_scores(bpw, np.array([c.is_keep for c in cands]), np.random.default_rng(args.seed))
    total = float(params.sum())
    budgets = [3.5, 3.75, 4.0, 4.25, 4.5, 4.75, 5.0, 5.5, 6.0]  # int3:g64 (3.5) is the least
    rows = []
    threads = os.environ.get("OMP_NUM_THREADS")
    print(f"{args.layers} layers x {len(cands)} candidates; OMP_NUM_THREADS={threads}")
    print(f"{'budget':>7} {'tied':>5} {'milp s':>8} {'optimal':>8} {'bits/w':>7} {'greedy gap':>11} "
          f"{'greedy s':>9} {'lagr gap':>9} {'lagr s':>7} {'plain s':>8} {'plain gap':>10}")
    for tied in (False, True):
        groups = tie_groups(layers) if tied else []
        for budget in budgets:
            cons = [Constraint("bits", bits, budget * total, per_weight=budget)]
            def run(method: str, cons=cons, groups=groups):
                return solve(scores, cons, groups=groups, method=method)

            milp_s, sol = timed(lambda: run("milp"), args.repeats)
            greedy_s, gr = timed(lambda: run("greedy"), args.repeats)
            lag_s, lg = timed(lambda: run("lagrangian"), args.repeats)
            problem = _problem(scores, cons, *_units(len(layers), groups), {})
            raw_s, (raw, raw_optimal) = timed(lambda p=problem: milp_choice(p, 60.0), 1)
            raw_gap = problem.objective[np.arange(raw.size), raw].sum() / sol.objective - 1  # per unit
            row = {"budget": budget, "tied": tied, "milp_s": milp_s, "optimal": sol.optimal,
                   "plain_milp_s": raw_s, "plain_milp_optimal": raw_optimal, "plain_milp_gap": raw_gap,
                   "objective": sol.objective, "bits_per_weight": sol.totals["bits"] / total,
                   "greedy_gap": gr.objective / sol.objective - 1, "greedy_s": greedy_s,
                   "lagrangian_gap": lg.objective / sol.objective - 1, "lagrangian_s": lag_s}
            rows.append(row)
            print(f"{budget:7.2f} {tied!s:>5} {milp_s:8.3f} {sol.optimal!s:>8} {row['bits_per_weight']:7.3f} "
                  f"{row['greedy_gap']:11.2e} {greedy_s:9.3f} {row['lagrangian_gap']:9.2e} {lag_s:7.3f} "
                  f"{raw_s:8.3f} {raw_gap:10.2e}")
    untied = [r for r in rows if not r["tied"]]
    summary = {"max_milp_s_untied": max(r["milp_s"] for r in untied),
               "all_optimal": all(r["optimal"] for r in rows),
               "max_greedy_gap": max(r["greedy_gap"] for r in rows),
               "max_lagrangian_gap": max(r["lagrangian_gap"] for r in rows),
               "max_plain_milp_s_untied": max(r["plain_milp_s"] for r in untied),
               "max_plain_milp_gap": max(r["plain_milp_gap"] for r in rows)}
    print(f"max milp {summary['max_milp_s_untied']:.3f} s (untied), all optimal: {summary['all_optimal']}, "
          f"max gap greedy {summary['max_greedy_gap']:.2e}, lagrangian {summary['max_lagrangian_gap']:.2e}; "
          f"plain MILP max {summary['max_plain_milp_s_untied']:.3f} s")
    result = {"protocol": "ilp-speed", "layers": args.layers, "candidates": CANDIDATES.split(","),
              "repeats": args.repeats, "seed": args.seed, "omp_num_threads": threads,
              "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count(), "scipy": scipy.__version__,
              "python": platform.python_version(), "machine": platform.machine(),
              "rows": rows, "summary": summary}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
