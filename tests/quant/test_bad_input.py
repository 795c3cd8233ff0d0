"""Bad and unusual input: unknown names, bad specs, shapes that do not fit, NaN and inf, empty
tensors, and non-float dtypes. Errors must be raised before any work and name the problem."""

from __future__ import annotations

import math

import pytest
import torch

from mixq.quant import core
from mixq import QuantSpec, Rounding, bit_count, dequantize, fake_quantize, quantize
from mixq.formats import UnknownFormatError, get
from mixq.quant import GroupSizeError, Grouping, MSEClip, SpecError


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- names and specs -----------------------------------------------------------------------------

def test_unknown_format_lists_close_matches():
    with pytest.raises(UnknownFormatError) as err:
        get("mxfp5")
    message = str(err.value)
    assert "'mxfp5'" in message and "mxfp4" in message and "mxfp6" in message
    with pytest.raises(ValueError):  # UnknownFormatError is a ValueError
        fake_quantize(torch.ones(4), "mxfp5")


def test_unknown_element_in_a_spec():
    with pytest.raises(UnknownFormatError, match="nvfp4"):
        QuantSpec.parse("nvfp5:g16")


@pytest.mark.parametrize("text,token", [("int4:g64:bogus", "bogus"), ("int4:chanel", "chanel"),
                                        ("int4:g64:asymm", "asymm"), ("mxfp4:fp99", "fp99"),
                                        ("int4:gg64", "gg64")])
def test_bad_spec_tokens_are_named(text, token):
    with pytest.raises(SpecError) as err:
        QuantSpec.parse(text)
    assert repr(token) in str(err.value)
    with pytest.raises(SpecError):
        fake_quantize(torch.ones(64), text)


@pytest.mark.parametrize("text", ["fp8_e4m3:asym", "nf4:g64:asym", "fp4_e2m1:g32:asym", "mxfp4:asym",
                                  "ternary:asym"])
def test_asymmetric_float_or_grid_elements_are_refused(text):
    with pytest.raises(SpecError):
        QuantSpec.parse(text)


# --- shapes that do not fit ----------------------------------------------------------------------

def test_group_size_that_does_not_divide_is_refused_before_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("scales were computed for a shape that does not fit")

    monkeypatch.setattr(core, "choose_scales", no_work)
    x = torch.zeros(64, 576)
    for call in (lambda: fake_quantize(x, "int4:g128"), lambda: quantize(x, "int4:g128"),
                 lambda: bit_count("int4:g128", (64, 576))):
        with pytest.raises(GroupSizeError) as err:
            call()
        assert "576" in str(err.value) and "128" in str(err.value)


@pytest.mark.parametrize("spec,shape", [("mxfp4", (4, 48)), ("nvfp4", (3, 8)), ("int4:b16x16", (16, 24)),
                                        ("int4:channel@2", (4, 6)), ("int4:channel", ()), ("int4:token", ()),
                                        ("int4:g4@0", (6, 8))])
def test_other_misfits(spec, shape):
    with pytest.raises(GroupSizeError):
        fake_quantize(torch.zeros(shape), spec)


# --- NaN and inf: the whole group decodes to NaN -------------------------------------------------

PER_GROUP_SPECS = ["int4:g32", "int8:channel", "int4:g32:asym", "fp8_e4m3:g32", "e5m2_nosat:g32", "nf4:g32",
                   "ternary:g32", "int4:g32:e8m0", "int4:g32:mse", "int4:g32:p90", "int4:g32:sr",
                   "fp4_e2m1:g32:fp8_e4m3",
                   "mxfp4", "mxfp6_e2m3", "mxfp8_e4m3", "mxint8", "int4:b2x32", "int4:token"]


@pytest.mark.parametrize("spec", PER_GROUP_SPECS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_value_makes_its_group_nan_and_leaves_the_rest(spec, bad):
    s = QuantSpec.parse(spec)
    x = randn(4, 64, seed=1)
    grouping = Grouping((4, 64), s.granularity)
    y = x.clone()
    y[2, 5] = bad
    got = grouping.to_groups(fake_quantize(y, s, generator=torch.Generator().manual_seed(0)))
    clean = grouping.to_groups(fake_quantize(x, s, generator=torch.Generator().manual_seed(0)))
    hit = grouping.to_groups(torch.isnan(y) | torch.isinf(y)).any(dim=1)
    assert int(hit.sum()) == 1
    assert torch.isnan(got[hit]).all()
    if s.rounding is not Rounding.STOCHASTIC and not isinstance(s.scale.clip, MSEClip):
        assert torch.equal(got[~hit], clean[~hit])
    assert not torch.isnan(got[~hit]).any()


@pytest.mark.parametrize("spec", ["fp8_e4m3:g32", "mxfp8_e4m3", "mxfp8_e5m2", "fp8_e5m2:channel",
                                  "e4m3_nosat:token"])
def test_quantize_keeps_the_nan_group_in_its_scale(spec):
    x = randn(4, 64, seed=2)
    x[1, 3] = math.nan
    qt = quantize(x, spec)
    d = dequantize(qt)
    assert torch.equal(torch.isnan(d), torch.isnan(fake_quantize(x, spec)))
    assert bool(torch.isnan(qt.scales).any())
    assert bool(torch.isnan(qt.spec.scale.format.decode(qt.scale_codes)).any())


def test_all_nan_and_all_inf_tensors():
    for spec in ("int4", "fp8_e4m3", "mxfp4", "int4:g32:asym"):
        for v in (math.nan, math.inf):
            assert torch.isnan(fake_quantize(torch.full((2, 32), v), spec)).all()


def test_values_beyond_the_scale_range_do_not_become_inf():
    x = torch.tensor([3.0e38, -3.3e38, 1.0, 0.0] * 8)
    for spec in ("int8", "fp8_e4m3", "mxfp8_e4m3", "nf4", "mxfp4:g4", "nvfp4"):
        out = fake_quantize(x, spec)
        assert bool(torch.isfinite(out).all()), spec


# --- empty tensors and dtypes --------------------------------------------------------------------

@pytest.mark.parametrize("spec,shape", [("int4", (0,)), ("int4:g64", (0, 64)), ("mxfp4", (0, 32)),
                                        ("nvfp4", (3, 0, 16)), ("int4:channel", (3, 0)),
                                        ("int4:token", (0, 8)), ("int4:g32:asym", (0, 32))])
def test_empty_tensors_give_empty_results(spec, shape):
    x = torch.empty(shape, dtype=torch.bfloat16)
    out = fake_quantize(x, spec)
    assert out.shape == x.shape and out.dtype == x.dtype and out.numel() == 0
    qt = quantize(x, spec)
    assert qt.codes.shape == x.shape
    d = dequantize(qt)
    assert d.shape == x.shape and d.dtype == x.dtype


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool,
                                   torch.complex64])
def test_non_float_dtypes_raise_type_error(dtype):
    x = torch.ones(4, 32).to(dtype)
    with pytest.raises(TypeError, match="floating-point"):
        fake_quantize(x, "int4:g32")
    with pytest.raises(TypeError):
        quantize(x, "int4:g32")


def test_non_tensors_raise_type_error():
    with pytest.raises(TypeError):
        fake_quantize([1.0, 2.0], "int4")
    with pytest.raises(TypeError):
        quantize(None, "int4")


def test_stochastic_rounding_needs_uniforms():
    for name in ("int4", "fp8_e4m3", "nf4", "e8m0"):
        with pytest.raises(ValueError, match="uniform"):
            get(name).round(torch.ones(3), Rounding.STOCHASTIC)
        with pytest.raises(ValueError, match="shape"):
            get(name).round(torch.ones(3), Rounding.STOCHASTIC, torch.zeros(4, dtype=torch.float64))
