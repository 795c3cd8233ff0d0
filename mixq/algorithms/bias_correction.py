"""Bias correction: absorb the mean output shift that weight quantization causes into the bias."""

from __future__ import annotations

from torch import Tensor


class BiasCorrectionError(ValueError):
    """Shapes that do not fit together for bias correction."""


def corrected_bias(W: Tensor, Wq: Tensor, x_mean: Tensor, bias: Tensor | None) -> Tensor:
    """``b + (W - Wq) x_mean`` ([out] fp32), so that ``E[X] Wq^T + b'`` equals ``E[X] W^T + b``.

    ``W``, ``Wq``: ``[out, in]`` float and quantized weights; ``x_mean``: ``[in]`` mean input over
    calibration rows; ``bias``: ``[out]`` or None (zero). The product is taken in fp64.
    """
    if W.dim() != 2 or W.shape != Wq.shape:
        raise BiasCorrectionError(f"W and Wq must both be [out, in] of one shape, got {tuple(W.shape)} "
                                  f"and {tuple(Wq.shape)}")
    if x_mean.shape != (W.shape[1],):
        raise BiasCorrectionError(f"x_mean must be [{W.shape[1]}], got {tuple(x_mean.shape)}")
    if bias is not None and bias.shape != (W.shape[0],):
        raise BiasCorrectionError(f"bias must be [{W.shape[0]}] or None, got {tuple(bias.shape)}")
    shift = (W.double() - Wq.to(W.device).double()) @ x_mean.to(W.device).double()  # [out]
    b = shift if bias is None else bias.to(W.device).double() + shift
    return b.float()
