"""QuantSpec: the string grammar, canonical strings, round trips, and refused combinations."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mixq import QuantSpec, Rounding
from mixq.formats import ExponentFormat, get
from mixq.quant import (AbsMaxClip, MSEClip, PerBlock, PercentileClip, PerChannel, PerGroup, PerTensor,
                        PerToken, ScaleRule, SpecError)

FP32 = get("fp32")


@pytest.mark.parametrize("token,granularity", [
    ("tensor", PerTensor()), ("channel", PerChannel(0)), ("channel@1", PerChannel(1)),
    ("channel@-1", PerChannel(-1)),
    ("token", PerToken()), ("g64", PerGroup(64)), ("g64@0", PerGroup(64, 0)), ("g128@-2", PerGroup(128, -2)),
    ("b16x16", PerBlock(16, 16)), ("b4x8", PerBlock(4, 8)),
])
def test_granularity_tokens(token, granularity):
    spec = QuantSpec.parse(f"int4:{token}")
    assert spec.granularity == granularity
    assert spec.format == get("int4")


def test_defaults():
    spec = QuantSpec.parse("int4")
    assert spec == QuantSpec(get("int4"))
    assert spec.granularity == PerTensor() and spec.rounding is Rounding.NEAREST
    assert spec.scale == ScaleRule(asymmetric=False, clip=AbsMaxClip(), format=FP32, rule="nearest",
                                   tensor_scale=None)
    assert QuantSpec.from_format("int4") == spec == QuantSpec.from_format(get("int4"))


@pytest.mark.parametrize("token,field,value", [
    ("asym", "asymmetric", True), ("sym", "asymmetric", False),
    ("absmax", "clip", AbsMaxClip()), ("mse", "clip", MSEClip()), ("mse16_0.5", "clip", MSEClip(16, 0.5)),
    ("p99.9", "clip", PercentileClip(99.9)), ("p100", "clip", PercentileClip(100.0)),
    ("fp16", "format", get("fp16")), ("bf16", "format", get("bf16")), ("ue5m3", "format", get("ue5m3")),
    ("fp8_e4m3", "format", get("fp8_e4m3")), ("e8m0", "format", ExponentFormat(8)),
    ("ceil", "rule", "ceil"), ("nearest", "rule", "nearest"),
    ("ts", "tensor_scale", FP32), ("ts=bf16", "tensor_scale", get("bf16")),
])
def test_scale_tokens(token, field, value):
    spec = QuantSpec.parse(f"int8:g32:{token}")
    assert getattr(spec.scale, field) == value


def test_scale_rule_defaults_follow_the_scale_format():
    assert QuantSpec.parse("int4:g32:e8m0").scale.rule == "floor"
    assert QuantSpec.parse("int4:g32:fp16").scale.rule == "nearest"
    assert QuantSpec.parse("int4:g32:e8m0:ceil").scale.rule == "ceil"


@pytest.mark.parametrize("token,rounding", [("rne", Rounding.NEAREST), ("sr", Rounding.STOCHASTIC),
                                            ("rtz", Rounding.TOWARD_ZERO)])
def test_rounding_tokens(token, rounding):
    assert QuantSpec.parse(f"fp8_e4m3:{token}").rounding is rounding


def test_block_presets_fill_in_layout():
    mx = QuantSpec.parse("mxfp4")
    assert mx == QuantSpec.from_format(get("mxfp4"))
    assert mx.format == get("fp4_e2m1") and mx.granularity == PerGroup(32)
    assert mx.scale == ScaleRule(format=ExponentFormat(8), rule="floor")
    nv = QuantSpec.parse("nvfp4")
    assert nv.granularity == PerGroup(16)
    assert (nv.scale.format, nv.scale.rule, nv.scale.tensor_scale) == (get("fp8_e4m3"), "nearest", FP32)
    assert QuantSpec.parse("mxfp4:g64").granularity == PerGroup(64)  # tokens override the preset
    assert QuantSpec.parse("mxint8").format == get("int8nf6")


@pytest.mark.parametrize("text,canonical", [
    ("int4:g64", "int4:g64"),
    ("int4:g64:sym:absmax:fp32:nearest:rne", "int4:g64"),
    ("int4:asym:g64", "int4:g64:asym"),
    ("int4:tensor", "int4"),
    ("mxfp4", "mxfp4"),
    ("mxfp4:sr", "mxfp4:sr"),
    ("mxfp4:mse", "mxfp4:mse"),
    ("fp4_e2m1:g32:e8m0", "mxfp4"),
    ("fp4_e2m1:g16:fp8_e4m3:ts", "nvfp4"),
    ("e4m3:g32:e8m0:floor", "mxfp8_e4m3"),
    ("mxfp4:g64", "fp4_e2m1:g64:e8m0"),
    ("mxfp4:nearest", "fp4_e2m1:g32:e8m0:nearest"),
    ("FP8_E4M3:Channel@1:E8M0", "fp8_e4m3:channel@1:e8m0"),
    ("e5m10:token:e5m10", "fp16:token:fp16"),
    ("int4:ts:g16:fp8_e4m3:ts=bf16", "int4:g16:fp8_e4m3:ts=bf16"),
    ("nf4:g64:mse16_0.5", "nf4:g64:mse16_0.5"),
    ("int4:rtz:p99.9", "int4:p99.9:rtz"),
])
def test_canonical_strings(text, canonical):
    spec = QuantSpec.parse(text)
    assert str(spec) == canonical
    assert QuantSpec.parse(canonical) == spec
    assert repr(spec) == f"QuantSpec({canonical!r})"


def test_token_order_does_not_matter():
    assert QuantSpec.parse("int4:asym:g64:mse:fp16:sr") == QuantSpec.parse("int4:sr:fp16:mse:g64:asym")


def test_later_tokens_win():
    assert QuantSpec.parse("int4:g64:channel").granularity == PerChannel(0)
    assert QuantSpec.parse("int4:asym:sym").scale.asymmetric is False


def test_parse_accepts_a_spec():
    spec = QuantSpec.parse("int4:g64")
    assert QuantSpec.parse(spec) is spec


# --- round trip over generated specs -------------------------------------------------------------

ELEMENTS = ["int4", "int8", "uint4", "int4n", "int2", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "fp6_e2m3",
            "e3m2b5_nosub", "nf4", "ternary", "binary", "pow4_1.5", "grid(-1.0,-0.5,0.0,0.5,1.0)", "fp16",
            "bf16"]
GRANS = ["tensor", "channel", "channel@1", "token", "g32", "g64@0", "b16x16", "g8@-2"]
CLIPS = ["absmax", "mse", "mse8_0.5", "p99.9", "p90"]
SCALES = ["fp32", "fp16", "bf16", "e8m0", "fp8_e4m3", "ue5m3", "ue4m3", "e4m0u", "int8"]
RULES = ["", "floor", "ceil", "nearest"]
TS = ["", "ts", "ts=bf16", "ts=fp16"]
ROUNDINGS = ["", "rne", "sr", "rtz"]


@given(st.sampled_from(ELEMENTS), st.sampled_from(GRANS), st.sampled_from(["sym", "asym"]),
       st.sampled_from(CLIPS), st.sampled_from(SCALES), st.sampled_from(RULES), st.sampled_from(TS),
       st.sampled_from(ROUNDINGS))
def test_parse_str_round_trip(element, gran, sym, clip, scale, rule, ts, rounding):
    text = ":".join(t for t in [element, gran, sym, clip, scale, rule, ts, rounding] if t)
    try:
        spec = QuantSpec.parse(text)
    except SpecError:
        assume(False)
        raise
    assert QuantSpec.parse(str(spec)) == spec
    assert str(QuantSpec.parse(str(spec))) == str(spec)
    assert spec.format == get(element)


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8",
                                  "nvfp4", "nvint4"])
def test_block_presets_round_trip(name):
    spec = QuantSpec.from_format(name)
    assert str(spec) == name
    assert QuantSpec.parse(str(spec)) == spec
    for extra in ("sr", "mse", "rtz"):
        s = QuantSpec.parse(f"{name}:{extra}")
        assert str(s) == f"{name}:{extra}" and QuantSpec.parse(str(s)) == s


# --- refused combinations ------------------------------------------------------------------------

@pytest.mark.parametrize("text,fragment", [
    ("", "empty"),
    ("int4:floor", "floor"),                 # floor needs a power-of-two scale format
    ("int4:fp16:floor", "floor"),
    ("fp8_e4m3:asym", "integer"),            # zero points need integer elements
    ("nf4:asym", "integer"),
    ("mxfp4:asym", "asym"),
    ("int4:e8m0:asym", "floor"),             # asymmetric with the OCP floor rule
    ("e8m0:g32", "scale format"),            # an exponent-only format holds no elements
    ("int4:mxfp4", "block format"),          # block formats cannot store scales
    ("int4:ts=nvfp4", "block format"),
    ("int4:nf4", "cannot store scales"),     # grids cannot store scales
    ("int4:p0", "percentile"),
    ("int4:p101", "percentile"),
    ("int4:g0", "g0"),
    ("int4:b0x4", "b0x4"),
    ("int4:bogus", "bogus"),
])
def test_refused_specs(text, fragment):
    with pytest.raises(SpecError) as err:
        QuantSpec.parse(text)
    assert fragment in str(err.value)


def test_misspelt_tokens_suggest_corrections():
    with pytest.raises(SpecError, match="channel"):
        QuantSpec.parse("int4:chanel")
    with pytest.raises(SpecError) as err:
        QuantSpec.parse("int4:asymm")
    assert "asym" in str(err.value) and "'asymm'" in str(err.value)


def test_direct_construction_is_validated():
    with pytest.raises(SpecError):
        QuantSpec(get("mxfp4"))
    with pytest.raises(SpecError):
        QuantSpec(get("e8m0"))
    with pytest.raises(SpecError):
        QuantSpec(get("fp8_e4m3"), scale=ScaleRule(asymmetric=True))
    with pytest.raises(SpecError):
        ScaleRule(rule="up")
    assert isinstance(SpecError("x"), ValueError)
