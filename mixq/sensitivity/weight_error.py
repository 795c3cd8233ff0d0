"""Weight quantization error of a candidate and the scores built from it (no data needed).

For a candidate ``c`` and a weight ``W`` ``[out, in]`` (fp32, the layout of
:func:`mixq.model.tree.weight_matrix`), ``Q(W)`` is round-to-nearest with the candidate's weight spec
and ``ΔW = Q(W) - W``. Scores (fp64 sums, larger = worse):

- ``weight``:  ``sum ΔW^2``;
- ``fisher``:  ``0.5 * sum F ⊙ ΔW^2`` (+ the input term, added by the caller);
- ``hessian``: ``0.5 * (tr(H) / n) * sum ΔW^2`` (HAWQ-V2, ``n`` = number of weights).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixq.algorithms.rtn import rtn
from mixq.plan.candidates import Candidate


def quantized_weight(W: Tensor, candidate: Candidate) -> Tensor | None:
    """``Q(W)`` fp32 ``[out, in]`` by RTN with the candidate's weight spec; None when weights stay (keep, inputs only)."""
    if candidate.spec.weights is None:
        return None
    return rtn(W, candidate.spec.weights).weight


def weight_delta(W: Tensor, Wq: Tensor | None) -> Tensor:
    """``ΔW = Q(W) - W`` fp32 ``[out, in]`` (zeros when ``Wq`` is None)."""
    return torch.zeros_like(W, dtype=torch.float32) if Wq is None else Wq.float() - W.float()


def squared_error(dW: Tensor) -> float:
    """``sum ΔW^2`` in fp64."""
    return float((dW.double() ** 2).sum())


def fisher_weight_term(F: Tensor, dW: Tensor) -> float:
    """``0.5 * sum F ⊙ ΔW^2`` in fp64; ``F`` and ``dW`` ``[out, in]``."""
    return 0.5 * float((F.double() * dW.double() ** 2).sum())


def hessian_score(trace: float, params: int, error: float) -> float:
    """HAWQ-V2: ``0.5 * (tr(H) / n) * sum ΔW^2``."""
    return 0.5 * trace / max(params, 1) * error
