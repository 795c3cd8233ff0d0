"""Integer-only requantization (HAWQ-V3 dyadic arithmetic): a reference, not a fast path.

An int8 linear layer ``y = (s_x xq) (s_w wq)^T + bias`` whose output is re-quantized to int8 with
scale ``s_y`` needs ``yq = round(acc * s_x s_w / s_y + bias / s_y)`` with the int32 accumulator
``acc = xq wq^T``. HAWQ-V3 replaces the real multiplier ``m = s_x s_w / s_y`` by a dyadic number
``b / 2**c`` (``b`` a 31-bit integer), and the bias by an int32 on the accumulator's scale
``s_x s_w``, so that inference needs only integer multiply, add and shift::

    yq = clamp((acc + bq) * b + 2**(c-1)) >> c, -128, 127)

Rounding is half-up (toward +inf at ties) where mixq's fake-quant rounds half to even, and the
dyadic multiplier carries a relative error below ``2**-30``: the result is within one step (1 LSB)
of the fake-quant reference, and equal almost everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mixq.export.layers import QuantizedLayer

MAX_SHIFT = 62


def dyadic(m: Tensor) -> tuple[Tensor, Tensor]:
    """Multipliers ``m`` (any shape, fp32/fp64, finite, > 0) -> ``(b, c)`` int64 with ``m ~= b / 2**c``.

    ``b < 2**31`` with ``c`` as large as that allows (at most 62), so ``b >= 2**30`` unless ``m`` is
    below ``2**-32``; relative error ``<= 2**-31`` in that normal range.
    """
    m = m.double()
    if not torch.isfinite(m).all() or (m <= 0).any():
        raise ValueError("dyadic multipliers must be finite and positive")
    _, e = torch.frexp(m)  # m = f * 2**e, f in [0.5, 1)
    c = (31 - e).to(torch.int64).clamp(0, MAX_SHIFT)  # m * 2**c < 2**31
    b = torch.round(torch.ldexp(m, c)).to(torch.int64)
    over = b >= 2 ** 31  # rounding reached 2**31: one bit less
    c = torch.where(over, c - 1, c)
    b = torch.where(over, torch.round(torch.ldexp(m, c)).to(torch.int64), b)
    if (c < 0).any() or (b >= 2 ** 31).any():
        raise ValueError("multiplier too large for a 31-bit dyadic number with a shift >= 0 (m ~ 2**31)")
    return b, c


def _shift_round(v: Tensor, c: Tensor) -> Tensor:
    """``round(v / 2**c)`` half-up for int64 ``v``, ``c >= 0`` (broadcast), by an arithmetic shift."""
    half = torch.where(c > 0, torch.ones_like(c) << (c - 1).clamp(min=0), torch.zeros_like(c))
    return (v + half) >> c


def int_linear(xq: Tensor, sx: Tensor | float, layer: QuantizedLayer, bias: Tensor | None,
               sy: Tensor | float) -> Tensor:
    """Integer-only int8 linear layer with int8 output codes.

    ``xq``: int8 ``[M, in]`` input codes with scale ``sx`` (a float, 0-d, or per-token ``[M]``).
    ``layer.weight``: int8 symmetric per-channel codes ``[out, in]`` (scales ``[out]``) or per-tensor.
    ``bias``: fp32 ``[out]`` or None. ``sy``: the output scale (float, 0-d or ``[out]``).
    Returns int8 ``[M, out]`` codes of ``y / sy`` (saturated to [-128, 127]). The real scales are
    used only to derive the integer constants ``bq``, ``b``, ``c``; the data path is integer-only.
    """
    w = layer.weight
    if w is None or w.spec.scale.asymmetric or w.spec.scale.tensor_scale is not None:
        raise ValueError(f"{layer.name}: int_linear needs symmetric weights without tensor scale")
    fmt = w.spec.format
    if getattr(fmt, "bit_width", None) is None or fmt.bit_width > 8 or getattr(fmt, "fraction_bits", 0):
        raise ValueError(f"{layer.name}: int_linear needs integer weights of at most 8 bits, got {fmt.name}")
    if xq.dtype != torch.int8 or xq.dim() != 2:
        raise ValueError(f"xq must be int8 [M, in], got {xq.dtype} {tuple(xq.shape)}")
    out, inn = w.shape
    wq = fmt.decode(w.codes).to(torch.int64)  # [out, in]
    sw = w.scales.double().reshape(-1)
    if sw.numel() not in (1, out):
        raise ValueError(f"{layer.name}: int_linear needs per-channel or per-tensor weight scales")
    M = xq.shape[0]
    sx_t = torch.as_tensor(sx, dtype=torch.float64).reshape(-1, 1).expand(M, 1)  # [M, 1]
    sy_t = torch.as_tensor(sy, dtype=torch.float64).reshape(1, -1)  # [1, 1] or [1, out]
    acc_scale = sx_t * sw.reshape(1, -1)  # [M, out] (or [M, 1]): scale of the int32 accumulator
    acc = xq.to(torch.int64) @ wq.t()  # [M, out] exact integers
    if bias is not None:
        bq = torch.round(bias.double().reshape(1, -1) / acc_scale).to(torch.int64)  # int32 bias
        acc = acc + bq
    b, c = dyadic((acc_scale / sy_t).expand(M, out))  # [M, out] each
    yq = _shift_round(acc * b, c)
    return yq.clamp(-128, 127).to(torch.int8)
