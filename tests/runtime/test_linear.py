"""Packed linear modules against mixq's fake-quant numerics.

Weight-only: the decoded tiles equal ``dequantize(codes)`` bit for bit, so outputs differ from the
fake-quant layer only by the order of fp32 summation (tolerance: ``1e-5 * (|x| @ |W|^T)``, about
K * eps for K <= 256 with margin). W8A8: input codes equal ``fake_quantize(x, int8:token)`` bit for bit,
the int32 accumulator is exact (compared with an int64 matmul), and ``acc * s_x * s_w`` is within
3 fp32 roundings of the exact product (``2**-21`` relative); the fake-quant fp32 matmul carries its own
summation error, so it is compared with the same ``1e-5 * (|x| @ |W|^T)`` bound.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mixq.algorithms.hadamard import block_hadamard
from mixq.export.layers import QuantizedLayer
from mixq.model.qmodules import ActQuantizer, QuantLinear
from mixq.quant import QuantSpec, dequantize, fake_quantize, quantize
from mixq.runtime.linear import PackedLinearW8A8, PackedLinearWeightOnly, supports, why_not
from mixq.runtime.tiles import int_matmul

Q = QuantSpec.parse
WEIGHT_ONLY = ["int2:g16", "int3:g32:asym", "int4:g64", "int4:channel", "int5:g16:asymf", "int6:channel:asym",
               "int7", "int8:channel", "uint4:g32", "int4:g32:ts", "fp4_e2m1:g32", "nf4:g64", "int4:g32:mse"]


def _weights(out: int = 96, inn: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inn, generator=g), torch.randn(out, generator=g) * 0.1


def _bound(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return 1e-5 * (x.abs() @ W.abs().t()) + 1e-30


@pytest.mark.parametrize("spec", WEIGHT_ONLY)
def test_weight_only_tiles_bit_identical(spec: str) -> None:
    W, b = _weights()
    qt = quantize(W, spec)
    layer = QuantizedLayer("l", qt)
    assert supports(layer) == "weight_only"
    m = PackedLinearWeightOnly.from_layer(layer, b, tile_rows=40)  # 96 rows: tiles 40, 40, 16
    Wq = dequantize(qt)
    tiles = torch.cat([m.weight_tile(r, min(r + 40, 96)) for r in range(0, 96, 40)])
    assert torch.equal(tiles, Wq)
    x = torch.randn(3, 5, 128)
    y = m(x)
    ref = nn.functional.linear(x, Wq, b)
    assert y.shape == (3, 5, 96)
    assert ((y - ref).abs() <= _bound(x, Wq)).all()


@pytest.mark.parametrize("spec", WEIGHT_ONLY)
def test_weight_only_never_holds_fp32_weight(spec: str) -> None:
    W, b = _weights()
    qt = quantize(W, spec)
    m = PackedLinearWeightOnly.from_layer(QuantizedLayer("l", qt), b)
    bits = round(torch.log2(torch.tensor(float(qt.spec.format.num_codes))).item())
    assert m.packed.dtype == torch.uint8 and m.packed.numel() == 96 * 128 * bits // 8
    for name, buf in m.named_buffers():
        assert buf.numel() < W.numel() / 4 or buf.dtype == torch.uint8, name  # nothing weight-sized in fp32


def test_weight_only_refusals() -> None:
    W, _ = _weights()
    assert supports(QuantizedLayer("l", quantize(W, "int4:b16x16"))) is None
    assert supports(QuantizedLayer("l", quantize(W, "ternary:channel"))) is None  # 3 codes: not a bit width
    assert supports(QuantizedLayer("l", quantize(W, "int4:g32"), Q("fp8_e4m3:token"))) is None
    assert supports(QuantizedLayer("l", None)) is None
    assert "int8:channel weights" in why_not(QuantizedLayer("l", quantize(W, "int4:b16x16"), Q("int8:token")))
    with pytest.raises(ValueError, match="l: weight-only packing supports"):
        PackedLinearWeightOnly.from_layer(QuantizedLayer("l", quantize(W, "int4:b16x16")), None)


def _w8a8(seed: int = 0, backend: str = "int_mm", **kw):
    W, b = _weights(seed=seed)
    qt = quantize(W, "int8:channel")
    layer = QuantizedLayer("l", qt, Q("int8:token"), **kw)
    assert supports(layer) == "w8a8"
    return PackedLinearW8A8.from_layer(layer, b, backend=backend), dequantize(qt), b


def test_w8a8_input_codes_match_fake_quant() -> None:
    m, _, _ = _w8a8()
    x = torch.randn(37, 128) * torch.rand(37, 1) * 10
    x[3] = 0.0  # an all-zero token
    x[5, 7] = 1e-42  # a row whose scale underflows
    x[6, :] = 0.0
    x[6, 0] = 1e-44
    xq, sx = m.quantize_input(x)
    assert xq.dtype == torch.int8
    assert torch.equal(xq.float() * sx[:, None], fake_quantize(x, "int8:token"))
    xr, sr = m.quantize_input_reference(x)
    assert torch.equal(xq, xr) and torch.equal(sx, sr)
    x[9, 3] = float("inf")  # non-finite rows: mixq's reference path
    xq, sx = m.quantize_input(x)
    assert torch.isnan(sx[9]) and torch.equal(sx[:9], sr[:9])


@given(st.lists(st.floats(-1e30, 1e30), min_size=8, max_size=8), st.floats(1e-30, 1e30))
def test_w8a8_fast_input_codes_equal_reference(values, mult) -> None:
    m, _, _ = _w8a8()
    x = torch.tensor(values, dtype=torch.float32).repeat(16).reshape(1, 128) * mult
    if not torch.isfinite(x).all():
        return
    xq, sx = m.quantize_input(x)
    xr, sr = m.quantize_input_reference(x)
    assert torch.equal(xq, xr) and torch.equal(sx, sr)


@pytest.mark.parametrize("M", [1, 16, 17, 64])
def test_int_accumulator_exact_both_backends(M: int) -> None:
    g = torch.Generator().manual_seed(M)
    xq = torch.randint(-128, 128, (M, 2100), generator=g, dtype=torch.int8)  # K > 2 chunks of 1024
    wq = torch.randint(-128, 128, (24, 2100), generator=g, dtype=torch.int8)
    exact = (xq.long() @ wq.long().t())
    for backend in ("int_mm", "fp32_exact"):
        acc = int_matmul(xq, wq, backend)
        assert acc.dtype == torch.int32 and torch.equal(acc.long(), exact), backend


@pytest.mark.parametrize("backend", ["int_mm", "fp32_exact"])
def test_w8a8_matches_fake_quant_quantlinear(backend: str) -> None:
    m, Wq, b = _w8a8(backend=backend)
    lin = nn.Linear(128, 96)
    with torch.no_grad():
        lin.weight.copy_(Wq)
        lin.bias.copy_(b)
    act = ActQuantizer(Q("int8:token"))
    act.enabled = True
    fq = QuantLinear(lin, inputs=act)
    x = torch.randn(2, 9, 128)
    with torch.no_grad():
        y, ref = m(x), fq(x)
    xq = fake_quantize(x, "int8:token")
    assert ((y - ref).abs() <= _bound(xq, Wq)).all()
    # against the exact product of the integer codes (fp64): three fp32 roundings at most
    codes, sx = m.quantize_input(x.reshape(-1, 128))
    exact = (codes.double() @ m.weight_codes.double().t()) * sx.double()[:, None] * m.weight_scale.double()
    y_nb = (y.reshape(-1, 96) - b).double()
    assert ((y_nb - exact).abs() <= 2**-21 * exact.abs() + 4 * b.abs().max() * 2**-24).all()


def test_w8a8_hadamard_and_kv_output() -> None:
    W, b = _weights()
    signs = torch.where(torch.rand(128) < 0.5, -1.0, 1.0)
    qt = quantize(W, "int8:channel")
    layer = QuantizedLayer("l", qt, Q("int8:token"), None, Q("int4:token"), hadamard=32, signs=signs)
    m = PackedLinearW8A8.from_layer(layer, b, backend="fp32_exact")
    x = torch.randn(4, 128)
    y = m(x)
    xr = fake_quantize(block_hadamard(x, 32, signs), "int8:token")
    pre = nn.functional.linear(xr, dequantize(qt), b)
    ref = fake_quantize(pre, "int4:token")
    step = pre.abs().amax(-1, keepdim=True) / 7  # one int4 output step
    # outputs on int4 steps of scale amax/7 (the scale itself moves by fp32 noise): the same code except
    # where that noise moves a value across a rounding edge, which changes it by one step
    assert ((y - ref).abs() <= step * 1.0001).all()
    assert ((y - ref).abs() <= 1e-4 * step).float().mean() > 0.95


def test_w8a8_refusals() -> None:
    W, _ = _weights()
    assert supports(QuantizedLayer("l", quantize(W, "int8:g32"), Q("int8:token"))) is None
    assert supports(QuantizedLayer("l", quantize(W, "int8:channel"), Q("int8:token:asym"))) is None
    assert supports(QuantizedLayer("l", quantize(W, "int8:channel"), Q("int8"),
                                   (torch.zeros(128), torch.ones(128)))) is None
    with pytest.raises(ValueError, match="backend"):
        _w8a8(backend="vnni")


@pytest.mark.parametrize("spec", WEIGHT_ONLY)
def test_fused_decode_kernel_matches_tiles(spec: str) -> None:
    """The numba kernel (<= 8 input rows, no autograd) decodes the same weights; only the dot's
    summation order differs (same bound as above)."""
    pytest.importorskip("numba")
    W, b = _weights()
    qt = quantize(W, spec)
    m = PackedLinearWeightOnly.from_layer(QuantizedLayer("l", qt), b)
    for rows in (1, 3):  # one row (decode; 4-bit codes take the nibble kernel), a few rows
        x = torch.randn(rows, 128)
        with torch.no_grad():
            m.kernel = True
            assert m._use_kernel(x) == (8 % m.bits == 0)  # 3, 5, 6, 7 bits: always the tile path
            y = m(x)
            m.kernel = False
            ref = m(x)
        assert ((y - ref).abs() <= _bound(x, dequantize(qt))).all()
