"""The name parser: every documented name, canonical names, presets, and helpful errors."""

from __future__ import annotations

import pytest

from mixq.formats import (BlockFormat, ExponentFormat, FloatFormat, GridFormat, IntFormat, UnknownFormatError,
                          get, names, scalar_presets, short_name)

EXPECTED = {
    "int2": IntFormat(2),
    "int8": IntFormat(8),
    "int16": IntFormat(16),
    "uint2": IntFormat(2, is_signed=False),
    "uint16": IntFormat(16, is_signed=False),
    "int4n": IntFormat(4, narrow=True),
    "fp8_e4m3": FloatFormat(4, 3, specials="fn"),
    "e4m3": FloatFormat(4, 3, specials="fn"),
    "fp8_e5m2": FloatFormat(5, 2, specials="ieee"),
    "fp6_e3m2": FloatFormat(3, 2, specials="none"),
    "fp6_e2m3": FloatFormat(2, 3, specials="none"),
    "fp4_e2m1": FloatFormat(2, 1, specials="none"),
    "e8m0": ExponentFormat(8),
    "e8m0_nosat": ExponentFormat(8, saturate=False),
    "ue4m3": FloatFormat(4, 3, specials="fn", is_signed=False),
    "ue5m3": FloatFormat(5, 3, specials="ieee", is_signed=False),
    "fp16": FloatFormat(5, 10, specials="ieee"),
    "bf16": FloatFormat(8, 7, specials="ieee"),
    "fp32": FloatFormat(8, 23, specials="ieee"),
    "e4m3fnuz": FloatFormat(4, 3, specials="fnuz"),
    "e4m3fn": FloatFormat(4, 3, specials="fn"),
    "e5m2fnuz": FloatFormat(5, 2, specials="fnuz"),
    "e5m2_nosat": FloatFormat(5, 2, specials="ieee", saturate=False),
    "e3m2b5_nosub": FloatFormat(3, 2, bias=5, subnormals=False, specials="none"),
    "e4m3_ieee_nosat": FloatFormat(4, 3, specials="ieee", saturate=False),
    "e4m3b11fnuz": FloatFormat(4, 3, bias=11, specials="fnuz"),
    "e3m4_ieee": FloatFormat(3, 4, specials="ieee"),
    "ternary": GridFormat((-1.0, 0.0, 1.0), label="ternary", bit_width=1.6),
    "binary": GridFormat((-1.0, 1.0), label="binary", bit_width=1.0),
    "grid(-1.0,0.0,1.0)": GridFormat((-1.0, 0.0, 1.0)),
    "grid(-1,-0.25,0,0.25,1)": GridFormat((-1.0, -0.25, 0.0, 0.25, 1.0)),
}

BLOCKS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8", "nvfp4", "nvint4"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_names_parse_to_the_documented_format(name):
    assert get(name) == EXPECTED[name]


def test_fnuz_bias_and_fp8_constants():
    assert get("e4m3fnuz").bias == 8 and get("e4m3fnuz").max == 240.0
    assert get("e5m2fnuz").bias == 16
    assert get("fp8_e5m2").max == 57344.0 and get("fp8_e4m3").max == 448.0
    assert get("fp6_e3m2").max == 28.0 and get("fp6_e2m3").max == 7.5 and get("fp4_e2m1").max == 6.0


@pytest.mark.parametrize("name", names())
def test_every_preset_parses_and_canonical_names_round_trip(name):
    fmt = get(name)
    assert get(fmt.name) == fmt
    assert get(name.upper()) == fmt and get(f"  {name} ") == fmt
    if isinstance(fmt, BlockFormat):
        assert fmt.name == name
    else:
        assert short_name(fmt) == name
        assert get(fmt) is fmt


def test_presets_list():
    listed = names()
    for name in ["int4", "uint8", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "e8m0", "ue4m3",
                 "ue5m3", "fp16", "bf16", "fp32", "nf4", "ternary", "binary", *BLOCKS]:
        assert name in listed
    assert len(listed) == len(set(listed))
    assert set(scalar_presets()) <= set(listed)


@pytest.mark.parametrize("name", ["e3m2b5_nosub", "e4m3_ieee_nosat", "e5m2fnuz_nosat", "ue4m3", "e2m5",
                                  "e3m4_ieee", "e4m0ub3", "pow3_0.75", "uint3", "int12", "e4m3b11fnuz",
                                  "e5m10_nosat", "e4m3_nosub"])
def test_custom_names_round_trip(name):
    fmt = get(name)
    assert get(fmt.name) == fmt
    assert get(short_name(fmt)) == fmt


def test_short_names():
    assert short_name(FloatFormat(5, 10)) == "fp16"
    assert short_name(FloatFormat(8, 7)) == "bf16"
    assert short_name(FloatFormat(4, 3, specials="fn")) == "fp8_e4m3"
    assert short_name(get("e3m2b5_nosub")) == "e3m2b5_nosub"


@pytest.mark.parametrize("name", BLOCKS)
def test_block_presets(name):
    fmt = get(name)
    assert isinstance(fmt, BlockFormat)
    if name.startswith("mx"):
        assert fmt.block == (32,) and fmt.scale == ExponentFormat(8) and fmt.tensor_scale is None
    else:
        assert fmt.block == (16,) and fmt.scale == get("fp8_e4m3") and fmt.tensor_scale == get("fp32")
    element = {"mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2", "mxfp6_e3m2": "fp6_e3m2",
               "mxfp6_e2m3": "fp6_e2m3", "mxfp4": "fp4_e2m1", "mxint8": "int8nf6", "nvfp4": "fp4_e2m1",
               "nvint4": "int4n"}[name]
    assert fmt.element == get(element)


def test_formats_are_hashable_values():
    assert len({get("fp8_e4m3"), FloatFormat(4, 3, specials="fn"), get("e4m3")}) == 1
    assert len({get("nf4"), get("nf4"), get("mxfp4"), get("mxfp4")}) == 2
    with pytest.raises(AttributeError):
        get("int4").bit_width = 5


@pytest.mark.parametrize("name,close", [("mxfp5", ["mxfp4", "mxfp6_e3m2"]), ("nvfp3", ["nvfp4"]),
                                        ("ternery", ["ternary"]), ("bf61", ["bf16"])])
def test_unknown_names_list_close_matches(name, close):
    with pytest.raises(UnknownFormatError) as err:
        get(name)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert repr(name) in message
    for c in close:
        assert c in message


def test_unknown_name_without_close_match():
    with pytest.raises(UnknownFormatError, match="unknown format 'zzzzzz'"):
        get("zzzzzz")


@pytest.mark.parametrize("name", ["fp8_e4m2", "int17", "int0", "uint4n", "e2m1_nosat", "ue4m3fnuz", "e9m2",
                                  "e4m3_fn_fnuz", "e1m2_ieee", "grid(1.0)", "grid(1.0,1.0)", "pow9_1",
                                  "pow4_0", "e9m0u"])
def test_inconsistent_names_raise_value_errors(name):
    with pytest.raises(ValueError):
        get(name)


def test_grid_with_bad_levels_is_an_unknown_format():
    with pytest.raises(UnknownFormatError, match="numbers"):
        get("grid(a,b)")
