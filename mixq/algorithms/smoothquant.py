"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights.

With per-input-channel factors ``s`` ([in]), ``X W^T = (X / s) (W s)^T``: dividing the activations
(fold into the previous op's output channels) and multiplying the weight columns leaves the float
output unchanged while ``max|X_j / s_j|`` and ``max|W[:, j] s_j|`` are balanced by ``alpha``:
``(max|X_j| / s_j)^alpha == (max|W_j| s_j)^(1 - alpha)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SmoothQuantError(ValueError):
    """Inputs to SmoothQuant that do not fit together (shapes, alpha out of range)."""


def smooth_factors(act_absmax: Tensor, weights: list[Tensor], alpha: float = 0.5) -> Tensor:
    """Smoothing factors ``s`` ([in] fp32, finite, >= 1e-5) for linears sharing one input.

    ``act_absmax``: ``[in]`` per-channel ``max|X_j|`` over calibration rows; ``weights``: the
    ``[out_i, in]`` matrices reading that input. ``s_j = a_j^alpha / w_j^(1 - alpha)`` with
    ``w_j = max_i max_rows |W_i[:, j]|``, clamped at 1e-5. Channels where ``a_j`` or ``w_j`` is 0
    (or not finite) get ``s_j = 1``: there is nothing to balance.
    """
    if not 0.0 <= alpha <= 1.0:
        raise SmoothQuantError(f"alpha must be in [0, 1], got {alpha}")
    if act_absmax.dim() != 1:
        raise SmoothQuantError(f"act_absmax must be [in], got shape {tuple(act_absmax.shape)}")
    if not weights:
        raise SmoothQuantError("expected at least one weight matrix [out, in], got an empty list")
    n_in = act_absmax.shape[0]
    for i, W in enumerate(weights):
        if W.dim() != 2 or W.shape[1] != n_in:
            raise SmoothQuantError(f"weight {i} must be [out, {n_in}] to match act_absmax, "
                                   f"got {tuple(W.shape)}")
    a = act_absmax.float().abs()  # [in]
    w = torch.stack([W.to(a.device, torch.float32).abs().amax(dim=0) for W in weights]).amax(dim=0)  # [in]
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)
    ok = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s))
