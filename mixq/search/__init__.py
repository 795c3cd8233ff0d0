"""Search: choose a candidate per layer under budgets (bits, bytes, BOPs, latency) and build the plan.

Pure numpy/scipy: costs (:mod:`costs`), the multiple-choice knapsack (:mod:`solve`, solved exactly by
HiGHS in :mod:`ilp` or by the :mod:`heuristics`), frontier sweeps (:mod:`frontier`), and plans,
pins and constraint files from a choice (:mod:`build`).
"""

from mixq.search.build import (allocation_rows, load_constraints, pins_from_patterns, plan_from_choice,
                               tie_groups)
from mixq.search.costs import COST_KINDS, LatencyTable, bits_per_weight, cost_matrix
from mixq.search.errors import InfeasibleError, SearchError
from mixq.search.frontier import FrontierPoint, pareto, sweep, uniform_points
from mixq.search.solve import METHODS, Constraint, Solution, solve

__all__ = ["COST_KINDS", "METHODS", "Constraint", "FrontierPoint", "InfeasibleError", "LatencyTable",
           "SearchError", "Solution", "allocation_rows", "bits_per_weight", "cost_matrix",
           "load_constraints", "pareto", "pins_from_patterns", "plan_from_choice", "solve", "sweep",
           "tie_groups", "uniform_points"]
