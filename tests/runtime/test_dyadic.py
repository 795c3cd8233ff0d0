"""Integer-only requantization (dyadic multipliers) against the fake-quant linear layer.

Reference: the fake-quant layer output ``y = fake_quantize(x) @ dequantize(W)^T + bias`` (fp64 here, so
that the reference itself carries no fp32 summation noise) quantized to int8 with the fixed scale ``s_y``
by mixq's int8 rounding. ``int_linear`` rounds half-up, quantizes the bias on the accumulator scale and
uses a 31-bit multiplier, so it may differ by one step (1 LSB); it must never differ by more, and
differs only rarely.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixq.export.layers import QuantizedLayer
from mixq.formats import get
from mixq.quant import QuantSpec, dequantize, quantize
from mixq.runtime.dyadic import dyadic, int_linear
from mixq.runtime.linear import PackedLinearW8A8

INT8 = get("int8")


@given(st.floats(1e-12, 1e6, allow_nan=False))
def test_dyadic_close_and_in_range(m: float) -> None:
    b, c = dyadic(torch.tensor([m], dtype=torch.float64))
    assert 0 < int(b) < 2**31 and 0 <= int(c) <= 62
    approx = int(b) / 2.0 ** int(c)
    assert abs(approx - m) <= m * 2**-30 or m < 2**-32  # tiny multipliers lose relative precision
    if m >= 2**-31:
        assert int(b) >= 2**30  # the largest shift that keeps b below 2**31


def test_dyadic_refuses_bad_multipliers() -> None:
    for bad in (0.0, -1.0, float("nan"), 2.0**31):
        with pytest.raises(ValueError):
            dyadic(torch.tensor([bad]))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_token", [False, True])
def test_int_linear_within_one_lsb(seed: int, per_token: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(64, 256, generator=g) * 0.05
    bias = torch.randn(64, generator=g) * 0.2
    x = torch.randn(48, 256, generator=g) * (torch.rand(48, 1, generator=g) + 0.5)
    layer = QuantizedLayer("l", quantize(W, "int8:channel"), QuantSpec.parse("int8:token"))
    packed = PackedLinearW8A8.from_layer(layer, None)
    xq, sx = packed.quantize_input(x)  # mixq's per-token codes and scales
    if not per_token:  # a static per-tensor input scale (HAWQ-V3's usual setting)
        sx = x.abs().max() / 127
        xq = INT8.round(x / sx).to(torch.int8)
        sx = sx.reshape(())
    x_fq = xq.double() * (sx.double()[:, None] if per_token else sx.double())
    y = x_fq @ dequantize(layer.weight).double().t()
    y = y + bias.double()
    sy = float(y.abs().max() / 100)  # some outputs saturate at the clamp too (127 * sy < max)
    ref = INT8.round((y / sy).float()).to(torch.int64)  # [M, out] mixq's int8 rounding (RNE, clamp)
    got = int_linear(xq, sx, layer, bias, sy).to(torch.int64)
    diff = (got - ref).abs()
    assert diff.max() <= 1
    assert (diff == 0).float().mean() > 0.99


def test_int_linear_refuses() -> None:
    W = torch.randn(8, 16)
    with pytest.raises(ValueError, match="symmetric"):
        int_linear(torch.zeros(2, 16, dtype=torch.int8), 1.0,
                   QuantizedLayer("l", quantize(W, "int8:channel:asym")), None, 1.0)
    with pytest.raises(ValueError, match="int8"):
        int_linear(torch.zeros(2, 16), 1.0, QuantizedLayer("l", quantize(W, "int8:channel")), None, 1.0)
