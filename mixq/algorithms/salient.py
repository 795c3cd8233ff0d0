"""Salient rows: the output channels that quantization hurts most (candidates to keep in float)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class SalientError(ValueError):
    """Arguments of salient-row selection that do not fit (shapes, fraction out of range)."""


def row_errors(W: Tensor, Wq: Tensor, H: Tensor | None = None) -> Tensor:
    """Estimated output error per row ([out] fp32): ``diag(E H E^T)`` with ``E = W - Wq``, or
    ``sum E^2`` per row when ``H`` ([in, in], e.g. ``2/n X^T X``) is None."""
    if W.dim() != 2 or W.shape != Wq.shape:
        raise SalientError(f"W and Wq must both be [out, in] of one shape, got {tuple(W.shape)} "
                           f"and {tuple(Wq.shape)}")
    E = W.float() - Wq.to(W.device).float()  # [out, in]
    if H is None:
        return (E ** 2).sum(dim=1)
    if H.shape != (W.shape[1], W.shape[1]):
        raise SalientError(f"H must be [{W.shape[1]}, {W.shape[1]}], got {tuple(H.shape)}")
    return ((E @ H.to(E.device).float()) * E).sum(dim=1)


def salient_rows(W: Tensor, Wq: Tensor, H: Tensor | None, fraction: float) -> Tensor:
    """Indices (LongTensor, sorted ascending) of the ``ceil(fraction * out)`` rows of largest
    :func:`row_errors`; ``fraction`` in [0, 1], 0 gives an empty tensor. The product
    ``fraction * out`` is rounded to 1e-9 before the ceiling, so 0.1 * 30 selects 3 rows, not 4.
    """
    if not 0.0 <= fraction <= 1.0:
        raise SalientError(f"fraction must be in [0, 1], got {fraction}")
    err = row_errors(W, Wq, H)
    k = min(err.shape[0], math.ceil(round(fraction * err.shape[0], 9)))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=err.device)
    return torch.topk(err, k).indices.sort().values
