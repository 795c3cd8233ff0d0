"""Block formats against slow, obvious oracles: OCP MX v1.0 and NVIDIA's two-level NVFP4 / NVINT4.

The oracles below loop over blocks in plain Python. Element grids come from ml_dtypes (for the
float elements) or from the integers (MXINT8: int8 with 6 fraction bits), not from mixq.

OCP MX v1.0, per block of 32: shared exponent ``X = floor(log2(max|x|)) - emax_elem`` (kept in
E8M0's range [-127, 127]); element ``P_i`` = ``x_i / 2**X`` rounded to nearest-even in the element
format, saturating at its max; value ``P_i * 2**X``. A block holding NaN or inf is all NaN.
"""

from __future__ import annotations

import bisect
import itertools
import math

import ml_dtypes
import numpy as np
import pytest
import torch

import mixq
from mixq import QuantSpec, bits_per_value, dequantize, fake_quantize, quantize
from mixq.formats import BlockFormat, ExponentFormat, FloatFormat, IntFormat, get


def nonnegative_grid(dtype) -> list[float]:
    """Finite non-negative values of an ml_dtypes type, in code order (= ascending)."""
    nbits = ml_dtypes.finfo(dtype).bits
    codes = np.arange(2 ** (nbits - 1), dtype=np.uint8)
    v = codes.view(dtype).astype(np.float64)
    v = v[np.isfinite(v)]
    assert (np.diff(v) > 0).all()
    return v.tolist()


# preset: (element magnitudes, index = code; emax of the element; ml_dtypes type of the element or
# None for MXINT8, whose elements are int8 with 6 fraction bits)
MX = {
    "mxfp8_e4m3": (nonnegative_grid(ml_dtypes.float8_e4m3fn), 8, ml_dtypes.float8_e4m3fn),
    "mxfp8_e5m2": (nonnegative_grid(ml_dtypes.float8_e5m2), 15, ml_dtypes.float8_e5m2),
    "mxfp6_e3m2": (nonnegative_grid(ml_dtypes.float6_e3m2fn), 4, ml_dtypes.float6_e3m2fn),
    "mxfp6_e2m3": (nonnegative_grid(ml_dtypes.float6_e2m3fn), 2, ml_dtypes.float6_e2m3fn),
    "mxfp4": (nonnegative_grid(ml_dtypes.float4_e2m1fn), 2, ml_dtypes.float4_e2m1fn),
    "mxint8": ([k / 64 for k in range(128)], 0, None),  # mixq keeps the symmetric range (no -128/64)
}
E4M3 = nonnegative_grid(ml_dtypes.float8_e4m3fn)


def assert_equal(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> None:
    bad = got != expected
    assert not bool(bad.any()), (f"{int(bad.sum())} differ: x {x[bad][:6].tolist()} "
                                 f"got {got[bad][:6].tolist()} expected {expected[bad][:6].tolist()}")


def rne_saturate(a: float, mags: list[float]) -> float:
    """Nearest of the ascending magnitudes ``mags`` to ``a >= 0``; ties to the even index; saturating."""
    if a >= mags[-1]:
        return mags[-1]
    i = bisect.bisect_right(mags, a) - 1
    lo, hi = mags[i], mags[i + 1]
    if a - lo < hi - a:
        return lo
    if hi - a < a - lo:
        return hi
    return lo if i % 2 == 0 else hi


def round_signed(v: float, mags: list[float]) -> float:
    return math.copysign(rne_saturate(abs(v), mags), v)


def floor_log2(a: float) -> int:
    return math.frexp(a)[1] - 1  # exact, unlike math.log2


def ocp_mx_oracle(x: torch.Tensor, mags: list[float], emax: int, block: int = 32):
    """(values like ``x``, shared exponent per block (None where the block is NaN), elements P)."""
    rows = x.double().reshape(-1, block).tolist()
    out, exps, elements = [], [], []
    for blk in rows:
        if not all(math.isfinite(v) for v in blk):
            out.append([math.nan] * block)
            elements.append([math.nan] * block)
            exps.append(None)
            continue
        amax = max(abs(v) for v in blk)
        X = 0 if amax == 0 else min(max(floor_log2(amax) - emax, -127), 127)
        P = [round_signed(v / 2.0 ** X, mags) for v in blk]
        out.append([p * 2.0 ** X for p in P])
        elements.append(P)
        exps.append(X)
    shape = x.shape
    values = torch.tensor(out, dtype=torch.float64).float().reshape(shape)
    return values, exps, torch.tensor(elements).reshape(shape)


def ocp_element_codes(P: torch.Tensor, dtype) -> torch.Tensor:
    """OCP bit patterns of element values: ml_dtypes for floats, two's complement int8 of P * 64."""
    if dtype is None:
        return (P * 64).round().to(torch.int64) & 0xFF
    return torch.from_numpy(P.numpy().astype(np.float32).astype(dtype).view(np.uint8).astype(np.int64))


def make_inputs(mags: list[float], emax: int) -> torch.Tensor:
    """[6, 64] = 12 blocks: random blocks over a wide range of magnitudes, and special blocks."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g, dtype=torch.float64)
    blocks = x.view(12, 32)
    for i, k in enumerate([-20, -3, 0, 1, 7, 30, 100]):
        blocks[i] *= 2.0 ** k
    blocks[7] = 0.0                                   # an all-zero block
    blocks[8, 5] = 1e4                                # one outlier
    # shared exponent below -127: E8M0 clamps it (MXINT8 too: its elements are k / 64, emax 0)
    blocks[9] *= 2.0 ** (emax - 130 if emax > 0 else -130)
    # every tie of the element grid: the block max is the element max, so X = 0
    ties = [(a + b) / 2 for a, b in itertools.pairwise(mags)][-31:]
    row = ties + [mags[-1]] * (32 - len(ties))
    blocks[10] = torch.tensor(row, dtype=torch.float64) * torch.tensor([(-1) ** i for i in range(32)])
    blocks[11] = torch.linspace(-1, 1, 32, dtype=torch.float64) * 2.0 ** emax * 1.99  # many elements saturate
    return x.float()


@pytest.mark.parametrize("name", list(MX))
def test_mx_matches_the_ocp_oracle(name):
    mags, emax, dtype = MX[name]
    x = make_inputs(mags, emax)
    expected, exps, P = ocp_mx_oracle(x, mags, emax)
    if dtype is not None:
        assert exps[9] == -127 and floor_log2(float(x.view(12, 32)[9].abs().max())) - emax < -127
    got = fake_quantize(x, name)
    assert_equal(got, expected, x)
    qt = quantize(x, name)
    assert torch.equal(dequantize(qt), got)
    assert qt.scale_codes.dtype == torch.int32 and qt.codes.shape == x.shape
    # element codes are the OCP bit patterns
    assert torch.equal(qt.codes.long(), ocp_element_codes(P, dtype))
    # the stored E8M0 scale is the OCP shared scale X for every element type, MXINT8 included
    nonzero = [i for i in range(len(exps)) if i != 7]  # the all-zero block's exponent is arbitrary
    assert qt.scale_codes[nonzero].tolist() == [exps[i] + 127 for i in nonzero]
    assert qt.scales[nonzero].tolist() == [2.0 ** exps[i] for i in nonzero]


@pytest.mark.parametrize("name", list(MX))
def test_mx_blocks_run_along_the_last_axis(name):
    mags, emax, _ = MX[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, generator=g) * torch.logspace(-3, 3, 64)
    expected, _, _ = ocp_mx_oracle(x, mags, emax)
    assert torch.equal(fake_quantize(x, name), expected)
    xt = x.transpose(0, 1)  # non-contiguous input gives the same values
    assert torch.equal(fake_quantize(xt, name), expected.transpose(0, 1))


@pytest.mark.parametrize("name", list(MX))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_mx_block_with_nan_or_inf_is_all_nan(name, bad):
    mags, emax, _ = MX[name]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, generator=g)
    x[1, 40] = bad  # block 3 of 4
    got = fake_quantize(x, name).reshape(4, 32)
    assert torch.isnan(got[3]).all()
    assert not torch.isnan(got[:3]).any()
    expected, _, _ = ocp_mx_oracle(x, mags, emax)
    assert torch.equal(got[:3], expected.reshape(4, 32)[:3])


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_e5m2"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_mx_nan_block_scale_code_is_the_e8m0_nan_code(name, bad):
    x = torch.ones(2, 64)
    x[0, 33] = bad
    qt = quantize(x, name)
    one = 127 - MX[name][1]  # 1.0 = P * 2**X with X = -emax
    assert qt.scale_codes.tolist() == [one, 255, one, one]
    assert torch.isnan(qt.scales[1])
    d = dequantize(qt).reshape(4, 32)
    assert torch.isnan(d[1]).all() and torch.equal(d[[0, 2, 3]], torch.ones(3, 32))


@pytest.mark.parametrize("name,bits", [("mxfp4", 4.25), ("mxfp6_e3m2", 6.25), ("mxfp6_e2m3", 6.25),
                                       ("mxfp8_e4m3", 8.25), ("mxfp8_e5m2", 8.25), ("mxint8", 8.25)])
def test_mx_bits_per_value(name, bits):
    fmt = get(name)
    assert isinstance(fmt, BlockFormat)
    assert fmt.bits == bits
    assert bits_per_value(name, (4, 64)) == bits
    assert bits_per_value(fmt, (3, 5, 32)) == bits
    assert (fmt.block, fmt.scale, fmt.tensor_scale) == ((32,), ExponentFormat(8), None)
    assert fmt.scale_rule == "floor"


# --- NVFP4 / NVINT4 ------------------------------------------------------------------------------

def nv_oracle(x: torch.Tensor, mags: list[float], block: int = 16):
    """Two-level scaling: fp32 tensor scale S = amax / (elem_max * 448), E4M3 block scale
    b = RNE(amax_b / (elem_max * S)), elements x / (b * S) to the element grid (RNE, saturating).
    Scales combine in fp32 (s = fp32(b * S)) and values are fp32(q * s), as mixq documents."""
    emax_val = mags[-1]
    f32 = np.float32
    amax = float(x.abs().max())
    S = f32(amax) / f32(emax_val * 448.0)
    out, bs = [], []
    for blk in x.double().reshape(-1, block).tolist():
        amax_b = max(abs(v) for v in blk)
        b = rne_saturate(amax_b / (emax_val * float(S)), E4M3) if amax_b > 0 else 1.0
        assert b > 0, "the oracle does not cover block scales that underflow E4M3"
        s = f32(b) * S
        out.append([float(f32(round_signed(v / float(s), mags)) * s) for v in blk])
        bs.append(b)
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape), bs, float(S)


NV = {"nvfp4": nonnegative_grid(ml_dtypes.float4_e2m1fn), "nvint4": [float(k) for k in range(8)]}


@pytest.mark.parametrize("name", list(NV))
def test_nv_two_level_scaling_matches_the_oracle(name):
    mags = NV[name]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-1, 1.5, 64)  # block ranges spread over ~2.5 decades
    x[3, :16] = 0.0
    # with amax = elem_max * 448 / 16 the tensor scale is exactly 1/16; a block whose max is
    # elem_max / 16 then has block scale 1, and its elements sit exactly on the element ties
    x[0, 0] = mags[-1] * 448 / 16
    ties = [(a + b) / 2 for a, b in itertools.pairwise(mags)] + [mags[-1]]
    ties = (ties * 2)[:16]
    x[5, 16:32] = torch.tensor(ties) / 16 * torch.tensor([(-1.0) ** i for i in range(16)])
    expected, bs, S = nv_oracle(x, mags)
    assert S == 1 / 16 and bs[4 * 5 + 1] == 1.0
    got = fake_quantize(x, name)
    assert_equal(got, expected, x)
    qt = quantize(x, name)
    assert torch.equal(dequantize(qt), got)
    assert qt.tensor_scale.shape == () and qt.tensor_scale.item() == S
    assert qt.scales.tolist() == bs
    assert torch.equal(get("fp8_e4m3").decode(qt.scale_codes), qt.scales)


def test_nvfp4_layout_and_bits():
    fmt = get("nvfp4")
    assert fmt.block == (16,) and fmt.scale == FloatFormat(4, 3, specials="fn")
    assert fmt.tensor_scale == get("fp32") and fmt.scale_rule == "nearest"
    assert fmt.bits == 4.5
    for shape in [(16, 64), (2, 3, 32), (16,)]:
        numel = math.prod(shape)
        assert bits_per_value("nvfp4", shape) == 4.5 + 32 / numel
    assert bits_per_value("nvint4", (16, 64)) == 4.5 + 32 / 1024


# --- custom block formats ------------------------------------------------------------------------

def test_two_dimensional_tiles_follow_the_oracle_per_tile():
    fmt = BlockFormat(FloatFormat(2, 1, specials="none"), ExponentFormat(8), (4, 4))
    spec = QuantSpec.from_format(fmt)
    assert spec.granularity == mixq.quant.PerBlock(4, 4)
    assert QuantSpec.parse(fmt.name) == spec
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 12, generator=g) * torch.logspace(-2, 2, 12)
    tiles = x.reshape(2, 4, 3, 4).transpose(1, 2).reshape(6, 16)
    mags, emax, _ = MX["mxfp4"]
    expected_tiles, _, _ = ocp_mx_oracle(tiles, mags, emax, block=16)
    expected = expected_tiles.reshape(2, 3, 4, 4).transpose(1, 2).reshape(8, 12)
    assert torch.equal(fake_quantize(x, spec), expected)
    assert bits_per_value(fmt, (8, 12)) == 4 + 8 / 16


def test_ceil_scale_rule_never_clips():
    fmt = BlockFormat(IntFormat(4, narrow=True), ExponentFormat(8), (32,), scale_rule="ceil")
    spec = QuantSpec.from_format(fmt)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 64, generator=g)
    qt = quantize(x, spec)
    scale = qt.scales.repeat_interleave(32).reshape(4, 64)
    err = (fake_quantize(x, spec) - x).abs()
    assert bool((err <= scale / 2).all())
    amax = x.reshape(8, 32).abs().amax(dim=1)
    assert bool((qt.scales >= amax / 7).all()) and bool((qt.scales < 2 * amax / 7).all())
    floor = quantize(x, "int4n:g32:e8m0").scales
    assert bool((qt.scales >= floor).all())


@pytest.mark.parametrize("element,scale,block,rule", [
    (ExponentFormat(8), ExponentFormat(8), (32,), "floor"),   # exponent-only elements
    (IntFormat(4), ExponentFormat(8), (0,), "floor"),         # empty block
    (IntFormat(4), ExponentFormat(8), (2, 2, 2), "floor"),    # 3-D block
    (IntFormat(4), get("fp16"), (32,), "floor"),              # floor needs power-of-two scales
    (IntFormat(4), ExponentFormat(8), (32,), "up"),           # unknown rule
])
def test_invalid_block_formats(element, scale, block, rule):
    with pytest.raises(ValueError):
        BlockFormat(element, scale, block, scale_rule=rule)
