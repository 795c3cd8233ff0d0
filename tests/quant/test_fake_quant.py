"""fake_quantize / quantize / dequantize: hand-computed values, the codes-and-scales contract,
scale formats and rules, clipping, rounding modes, dtypes and shapes."""

from __future__ import annotations

import math

import pytest
import torch

from mixq import QuantSpec, dequantize, fake_quantize, quantize
from mixq.formats import get
from mixq.quant import Grouping


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- hand-computed values ------------------------------------------------------------------------

def test_int4_per_tensor_by_hand():
    # scale = 14 / 7 = 2; x / 2 = [7, 2.5, -1.5, 0.5, -3.2] -> [7, 2, -2, 0, -3] (ties to even)
    x = torch.tensor([14.0, 5.0, -3.0, 1.0, -6.4])
    assert fake_quantize(x, "int4").tolist() == [14.0, 4.0, -4.0, 0.0, -6.0]
    qt = quantize(x, "int4")
    assert qt.codes.tolist() == [7, 2, 14, 0, 13]  # -2 and -3 in 4-bit two's complement
    assert qt.scales.tolist() == [2.0] and qt.zero_points is None and qt.tensor_scale is None


def test_int4_asymmetric_by_hand():
    # range [min(x, 0), max(x, 0)] = [0, 3] over 15 steps: scale 0.2, zero point -8
    x = torch.tensor([0.0, 1.5, 3.0, 0.1])
    qt = quantize(x, "int4:asym")
    s = torch.tensor(3.0) / 15
    assert qt.scales.tolist() == [s.item()] and qt.zero_points.tolist() == [-8.0]
    r = torch.round(x / s) - 8  # [0, 7.5 -> 8, 15, 0.5 -> 0] - 8
    assert r.tolist() == [-8, 0, 7, -8]
    expected = (r + 8) * s
    assert torch.equal(fake_quantize(x, "int4:asym"), expected)
    assert get("int4").decode(qt.codes).tolist() == [-8, 0, 7, -8]


def test_int4_asymmetric_zero_point_is_rounded_by_hand():
    # range [-1, 3.5]: scale 4.5 / 15 = 0.3, zero point -8 - round(-1 / 0.3) = -8 - round(-3.33) = -5
    x = torch.tensor([-1.0, 3.5, 0.0, 1.0])
    qt = quantize(x, "int4:asym")
    s = torch.tensor(4.5) / 15
    assert qt.scales.tolist() == [s.item()] and qt.zero_points.tolist() == [-5.0]
    r = (torch.round(x / s) - 5).clamp(-8, 7)  # [-3, 11.67 -> 12, 0, 3.33 -> 3] - 5
    assert get("int4").decode(qt.codes).tolist() == r.tolist() == [-8, 7, -5, -2]
    assert torch.equal(fake_quantize(x, "int4:asym"), (r + 5) * s)  # 3.5 -> 12 * 0.3; 0 stays exactly 0


def test_asymmetric_uses_the_whole_grid_on_one_sided_data():
    x = torch.rand(4, 64, generator=torch.Generator().manual_seed(1)) * 5
    err_sym = (fake_quantize(x, "int4:channel") - x).abs().max()
    err_asym = (fake_quantize(x, "int4:channel:asym") - x).abs().max()
    assert err_asym < 0.6 * err_sym
    assert fake_quantize(torch.tensor([0.0, 1.3, 2.0]), "int4:asym")[0].item() == 0.0  # zero is exact


def test_fp8_per_channel_by_hand():
    x = torch.tensor([[448.0, 1.0, 3.3], [4.0, -2.0, 0.01]])
    # channel 0: scale 1 -> e4m3 values; channel 1: scale 4 / 448
    got = fake_quantize(x, "fp8_e4m3:channel")
    assert got[0].tolist() == [448.0, 1.0, 3.25]
    s = torch.tensor(4.0) / 448
    assert torch.equal(got[1], get("fp8_e4m3").round(x[1] / s) * s)


def test_e8m0_scales_are_powers_of_two_by_the_floor_rule():
    x = torch.tensor([[5.0, 1.0], [0.3, -0.2]])
    qt = quantize(x, "int4:channel:e8m0")
    # floor(log2 5) - floor(log2 7) = 0; floor(log2 0.3) - 2 = -4
    assert qt.scales.tolist() == [1.0, 2.0 ** -4]
    assert qt.scale_codes.tolist() == [127, 123]
    assert fake_quantize(x, "int4:channel:e8m0").tolist() == [[5.0, 1.0], [0.3125, -0.1875]]


# --- the codes-and-scales contract ---------------------------------------------------------------

SPECS = [
    "int4", "int8:channel", "int4:g32", "int4:g32:asym", "uint4:g16:asym", "int4n:channel@1", "int8:token",
    "int4:b4x8", "int4:g4@0", "int4:g32:e8m0", "int4:g32:fp16", "int4:g32:bf16:ceil", "int4:g32:ue5m3",
    "int4:g32:mse", "int4:g32:p90", "int4:g32:asym:mse8_0.5", "int8:g32:fp8_e4m3:ts", "fp8_e4m3",
    "fp8_e5m2:channel",
    "fp8_e4m3:g32:e8m0:ceil", "fp6_e2m3:g32", "fp4_e2m1:g16:fp8_e4m3:ts=bf16", "e3m2b5_nosub:g16", "nf4:g64",
    "ternary:channel", "binary:g32", "pow4_1.5:g32", "grid(-1.0,-0.25,0.0,0.25,1.0):g32", "fp16:channel",
    "bf16",
    "mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8", "nvfp4", "nvint4",
    "int4:g32:sr", "mxfp4:sr", "nf4:g32:sr", "int4:g32:asym:sr", "fp8_e4m3:rtz", "int4:rtz:mse",
]


@pytest.mark.parametrize("text", SPECS)
def test_dequantize_of_quantize_is_fake_quantize(text):
    spec = QuantSpec.parse(text)
    x = randn(8, 64, seed=2) * torch.logspace(-1, 1, 64)
    fq = fake_quantize(x, spec, generator=torch.Generator().manual_seed(7))
    qt = quantize(x, spec, generator=torch.Generator().manual_seed(7))
    d = dequantize(qt)
    assert torch.equal(d, fq)
    assert torch.equal(qt.dequantize(), fq)
    grouping = Grouping(tuple(x.shape), spec.granularity)
    G = grouping.num_groups
    assert qt.codes.shape == x.shape and qt.codes.dtype == torch.int32
    assert qt.scales.shape == (G,) and qt.scale_codes.shape == (G,) and qt.scale_codes.dtype == torch.int32
    # scales are values of the scale format
    assert torch.equal(spec.scale.format.decode(qt.scale_codes), qt.scales)
    assert torch.equal(spec.scale.format.round(qt.scales), qt.scales)
    assert (qt.zero_points is not None) == spec.scale.asymmetric
    assert (qt.tensor_scale is not None) == (spec.scale.tensor_scale is not None)
    assert (qt.shape, qt.dtype, qt.spec) == (tuple(x.shape), x.dtype, spec)
    # every element code is a code of the element format, and re-encodes to itself
    values = spec.format.decode(qt.codes)
    assert bool(torch.isfinite(values).all())
    assert torch.equal(spec.format.encode(values), qt.codes)
    # the reconstruction, group by group: (value - zero) * scale
    scale = qt.scales * qt.tensor_scale if qt.tensor_scale is not None else qt.scales
    V = grouping.to_groups(values)
    if qt.zero_points is not None:
        V = V - qt.zero_points[:, None]
    assert torch.equal(grouping.from_groups(V * scale[:, None]), fq)


@pytest.mark.parametrize("text", ["int4:g32", "fp8_e4m3:channel", "mxfp4", "nvfp4", "nf4:g64:mse"])
def test_error_is_bounded_by_the_scale(text):
    x = randn(8, 64, seed=3)
    qt = quantize(x, text)
    spec = qt.spec
    grouping = Grouping(tuple(x.shape), spec.granularity)
    X, F = grouping.to_groups(x), grouping.to_groups(fake_quantize(x, text))
    scale = qt.scales * qt.tensor_scale if qt.tensor_scale is not None else qt.scales
    # |error| <= largest element step * scale / 2, or the clipping where the scale rounded down
    v = spec.format.values()
    step = (v[1:] - v[:-1]).max()
    clip = (X.abs() - spec.format.max * scale[:, None]).clamp(min=0)
    assert bool(((F - X).abs() <= step * scale[:, None] / 2 + clip + 1e-6 * X.abs()).all())


# --- scale formats, rules and clipping -----------------------------------------------------------

def test_scale_formats_store_their_values():
    x = randn(4, 64, seed=4)
    fp16, bf16 = quantize(x, "int4:g32:fp16").scales, quantize(x, "int4:g32:bf16").scales
    assert torch.equal(fp16.half().float(), fp16) and not torch.equal(fp16.bfloat16().float(), fp16)
    assert torch.equal(bf16.bfloat16().float(), bf16)
    s = quantize(x, "int4:g32:e8m0").scales
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)


def test_ceil_rule_never_clips_and_nearest_may():
    x = randn(16, 64, seed=5)
    for spec in ("int4:g16:fp8_e4m3:ceil", "int4:g16:e8m0:ceil", "int4:g16:bf16:ceil"):
        qt = quantize(x, spec)
        amax = x.reshape(-1, 16).abs().amax(dim=1)
        assert bool((qt.scales * 7 >= amax).all()), spec
    near = quantize(x, "int4:g16:fp8_e4m3")
    amax = x.reshape(-1, 16).abs().amax(dim=1)
    assert bool((near.scales * 7 < amax).any())  # rounded down somewhere: the max element saturates


def test_mse_clip_is_never_worse_than_absmax():
    x = randn(16, 64, seed=6)
    x[:, 0] *= 8  # outliers make clipping worthwhile
    for base in ("int4:g32", "int3:channel", "fp4_e2m1:g32", "nf4:g64", "int4:g32:asym"):
        e_abs = (fake_quantize(x, base) - x).pow(2).reshape(-1, 32).sum(dim=1)
        e_mse = (fake_quantize(x, base + ":mse") - x).pow(2).reshape(-1, 32).sum(dim=1)
        if "channel" in base or "g64" in base:
            e_abs, e_mse = e_abs.sum(), e_mse.sum()
        assert bool((e_mse <= e_abs).all()), base
        assert e_mse.sum() < e_abs.sum(), base


def test_percentile_clip():
    x = torch.arange(1, 101, dtype=torch.float32)  # magnitudes 1..100
    assert torch.equal(fake_quantize(x, "int8:p100"), fake_quantize(x, "int8"))
    qt = quantize(x, "int8:p90")
    assert qt.scales.item() == torch.tensor(90.0).div(127).item()
    fq = fake_quantize(x, "int8:p90")
    assert bool((fq[90:] == fq[89]).all()) and fq.max().item() < 90.5


def test_tensor_scale_two_levels():
    x = randn(4, 64, seed=7) * 3
    qt = quantize(x, "int4:g16:fp8_e4m3:ts")
    amax = x.abs().max()
    assert qt.tensor_scale.item() == (amax / (7 * 448)).item()
    assert qt.scales.max().item() <= 448


# --- rounding modes ------------------------------------------------------------------------------

def test_toward_zero_never_grows_magnitudes():
    x = randn(8, 64, seed=8)
    for spec in ("int4:g32:e8m0:rtz", "fp4_e2m1:g32:e8m0:rtz", "mxfp4:rtz", "nf4:g32:e8m0:rtz"):
        fq = fake_quantize(x, spec)
        assert bool((fq.abs() <= x.abs()).all()), spec
        assert bool((torch.sign(fq) * torch.sign(x) >= 0).all()), spec


def test_stochastic_rounding_is_reproducible_and_seeded():
    x = randn(4, 64, seed=9)
    a = fake_quantize(x, "int4:g32:sr", generator=torch.Generator().manual_seed(1))
    b = fake_quantize(x, "int4:g32:sr", generator=torch.Generator().manual_seed(1))
    c = fake_quantize(x, "int4:g32:sr", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = fake_quantize(x, "int4:g32:sr")
    torch.manual_seed(5)
    assert torch.equal(fake_quantize(x, "int4:g32:sr"), d)
    rne = fake_quantize(x, "int4:g32")
    s = quantize(x, "int4:g32").scales.repeat_interleave(32).reshape(4, 64)
    assert bool(((a - rne).abs() <= s * 1.0001).all())  # a neighbour of the nearest value


# --- dtypes and shapes ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
def test_dtype_is_preserved_and_computation_is_fp32(dtype):
    x = randn(4, 64, seed=10).to(dtype)
    for spec in ("int4:g32", "mxfp4", "nvfp4"):
        fq = fake_quantize(x, spec)
        assert fq.dtype == dtype and fq.shape == x.shape
        assert torch.equal(fq, fake_quantize(x.float(), spec).to(dtype))
        assert dequantize(quantize(x, spec)).dtype == dtype


def test_input_is_not_modified_and_layout_does_not_matter():
    x = randn(64, 8, seed=11)
    keep = x.clone()
    xt = x.T  # non-contiguous
    got = fake_quantize(xt, "int4:g32")
    assert torch.equal(x, keep)
    assert torch.equal(got, fake_quantize(xt.contiguous(), "int4:g32"))


def test_zeros_and_constant_tensors():
    z = torch.zeros(2, 64)
    for spec in ("int4:g32", "int4:g32:asym", "mxfp4", "nvfp4", "fp8_e4m3", "nf4:g32", "int4:g32:mse"):
        assert torch.equal(fake_quantize(z, spec), z), spec
    c = torch.full((2, 32), -3.0)
    for spec in ("int4:g32", "mxfp4", "fp8_e4m3", "nvfp4"):
        assert torch.equal(fake_quantize(c, spec), c), spec


def test_scalar_and_vector_inputs():
    for spec in ("int4", "fp4_e2m1", "nf4"):
        out = fake_quantize(torch.tensor(3.3), spec)
        assert out.shape == () and out.item() == pytest.approx(3.3, rel=1e-6)  # the max maps to the max
    v = torch.tensor([1.0, -7.0, 2.5])
    assert fake_quantize(v, "int4").tolist() == [1.0, -7.0, 2.0]


def test_huge_and_tiny_magnitudes_stay_finite():
    for k in (-30, 30):
        x = randn(2, 64, seed=12) * 10.0 ** k
        for spec in ("int8:channel", "fp8_e4m3:g32", "mxfp8_e4m3", "nvfp4"):
            fq = fake_quantize(x, spec)
            assert bool(torch.isfinite(fq).all()), (k, spec)
            rel = ((fq - x).double().norm() / x.double().norm()).item()
            assert rel < 0.1, (k, spec, rel)


def test_accepts_spec_objects_and_strings_alike():
    x = randn(2, 64, seed=13)
    assert torch.equal(fake_quantize(x, QuantSpec.parse("int4:g32")), fake_quantize(x, "int4:g32"))
    assert torch.equal(fake_quantize(x, "int4:g32", backend="torch"), fake_quantize(x, "int4:g32"))


def test_sqnr_floors():
    x = randn(16, 256, seed=14)

    def sqnr(spec: str) -> float:
        e = fake_quantize(x, spec) - x
        return 10 * math.log10(x.pow(2).sum().item() / e.pow(2).sum().item())

    # rough textbook figures for Gaussian data; a broken rounding or scale falls far below them
    assert sqnr("int8:channel") > 35
    assert sqnr("fp8_e4m3:channel") > 28
    assert sqnr("mxfp8_e4m3") > 28
    assert sqnr("int4:g32") > 18
    assert sqnr("mxfp4") > 15
    assert sqnr("nvfp4") > 18
    assert sqnr("nf4:g64") > 19
    assert sqnr("int4:g32") < sqnr("int8:g32")
