"""Search errors: a bad request (:class:`SearchError`), an infeasible budget (:class:`InfeasibleError`)."""

from __future__ import annotations

import math

UNITS = {"bits": "bits", "bytes": "bytes", "bops": "BOPs", "latency": "s"}
"""Unit of each cost kind in messages (per weight when a constraint was given per weight)."""


class SearchError(ValueError):
    """A search that cannot run as asked; the message names the layer, candidate, pattern or file."""


class InfeasibleError(SearchError):
    """No choice meets the constraints.

    ``kind``: the cost kind whose limit is too small; ``limit``: that limit as given (per weight when the
    constraint was given per weight, else absolute); ``minimum``: the smallest feasible limit in the same
    units, or None when other constraints alone are already infeasible; ``per_weight``: whether both are
    per weight.
    """

    def __init__(self, kind: str, limit: float, minimum: float | None, *, per_weight: bool = False,
                 detail: str = "") -> None:
        self.kind, self.limit, self.minimum, self.per_weight = kind, limit, minimum, per_weight
        unit = UNITS.get(kind, kind) + ("/weight" if per_weight else "")
        budget = kind == "bits" or per_weight
        what = f"budget {_fmt(limit)} {unit}" if budget else f"{kind} limit {_fmt(limit)} {unit}"
        if minimum is None:
            tail = f"; {detail}" if detail else ""
            super().__init__(f"{what} is infeasible with these candidates and constraints{tail}")
        else:
            tail = f" ({detail})" if detail else ""
            super().__init__(f"{what} is infeasible with these candidates and constraints; "
                             f"the smallest feasible is {_fmt(minimum, up=True)} {unit}{tail}")


def _fmt(value: float, up: bool = False) -> str:
    """A short number (5 significant digits); ``up`` rounds up so that the value shown is feasible."""
    if not math.isfinite(value) or value == 0:
        return f"{value:g}"
    digits = 4 - math.floor(math.log10(abs(value)))  # 5 significant digits
    if up and digits > 0:
        scale = 10.0 ** digits
        rounded = math.ceil(value * scale - 1e-6) / scale
        return f"{rounded:.{digits}f}".rstrip("0").rstrip(".")
    return f"{value:.5g}"
