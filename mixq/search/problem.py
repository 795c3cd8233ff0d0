"""The search problem over units (a layer, or a tie group merged into one), as the solvers see it.

Pick one candidate per unit, minimise the summed objective, keep every summed cost within its limit.
Each solver (:mod:`mixq.search.ilp`, :mod:`mixq.search.heuristics`) returns a ``[U]`` int64 choice, or
None when it finds no feasible choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEAS_REL = 1e-9
"""Relative slack on a limit before a choice counts as over it (floating-point sums in another order)."""


@dataclass(frozen=True, eq=False)
class Problem:
    """``objective`` [U, C] float64 (finite where allowed), ``costs`` [K, U, C] float64 (0 where not
    allowed), ``limits`` [K], ``allowed`` [U, C] bool with at least one True per row."""

    objective: np.ndarray
    costs: np.ndarray
    limits: np.ndarray
    allowed: np.ndarray

    @property
    def tolerance(self) -> np.ndarray:
        """[K] absolute slack per limit."""
        return FEAS_REL * np.maximum(np.abs(self.limits), 1e-300)

    def totals(self, choice: np.ndarray) -> np.ndarray:
        """[K] summed costs of a ``[U]`` choice."""
        return self.costs[:, np.arange(choice.size), choice].sum(axis=1)

    def feasible(self, choice: np.ndarray) -> bool:
        return bool(np.all(self.totals(choice) <= self.limits + self.tolerance))

    def masked(self, values: np.ndarray) -> np.ndarray:
        """``values`` [U, C] with +inf where not allowed."""
        return np.where(self.allowed, values, np.inf)
