"""Minifloats (FloatFormat): every code of every <= 8-bit format against ml_dtypes and torch.

Reference semantics:

- ``decode`` of every code equals ml_dtypes' view of the same byte (values, the sign of zero, NaN).
- ``round`` of the ``_nosat`` variant equals ml_dtypes' cast on random values, on every exact tie,
  beyond ``max`` and at infinities (ml_dtypes overflows to inf or NaN).
- The presets saturate instead (mixq's deliberate difference), and NaN stays NaN even for formats
  that have no NaN code (ml_dtypes turns it into -0 there).
- fp16 / bf16 match torch's casts except that the presets saturate; fp32 is the identity.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from mixq.formats import FloatFormat, Rounding, get

# (mixq name, ml_dtypes type, the mixq name with ml_dtypes' overflow behaviour)
ML_DTYPES = [
    ("fp8_e4m3", ml_dtypes.float8_e4m3fn, "e4m3_nosat"),
    ("fp8_e5m2", ml_dtypes.float8_e5m2, "e5m2_nosat"),
    ("e4m3fnuz", ml_dtypes.float8_e4m3fnuz, "e4m3fnuz_nosat"),
    ("e5m2fnuz", ml_dtypes.float8_e5m2fnuz, "e5m2fnuz_nosat"),
    ("e4m3b11fnuz", ml_dtypes.float8_e4m3b11fnuz, "e4m3b11fnuz_nosat"),
    ("e3m4_ieee", ml_dtypes.float8_e3m4, "e3m4_ieee_nosat"),
    ("e4m3_ieee", ml_dtypes.float8_e4m3, "e4m3_ieee_nosat"),
    # OCP FP6/FP4 have neither inf nor NaN: ml_dtypes saturates them like mixq does
    ("fp6_e3m2", ml_dtypes.float6_e3m2fn, "fp6_e3m2"),
    ("fp6_e2m3", ml_dtypes.float6_e2m3fn, "fp6_e2m3"),
    ("fp4_e2m1", ml_dtypes.float4_e2m1fn, "fp4_e2m1"),
]
ML_IDS = [name for name, _, _ in ML_DTYPES]

# (mixq name, torch dtype): the variant whose overflow behaviour is torch's (checked below)
TORCH_FLOAT8 = [
    ("fp8_e4m3", torch.float8_e4m3fn),  # torch saturates e4m3fn casts, infinities included
    ("e5m2_nosat", torch.float8_e5m2),
    ("e4m3fnuz_nosat", torch.float8_e4m3fnuz),
    ("e5m2fnuz_nosat", torch.float8_e5m2fnuz),
]


def mismatches(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Mask of positions where two fp32 tensors differ in value, sign of zero, or NaN-ness."""
    a, e = actual.float(), expected.float()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    same = (a == e) & (torch.signbit(a) == torch.signbit(e))
    return ~((same & ~nan_a) | (nan_a & nan_e))


def assert_same(actual: torch.Tensor, expected: torch.Tensor, inputs: torch.Tensor | None = None) -> None:
    assert actual.shape == expected.shape
    bad = mismatches(actual, expected)
    if bool(bad.any()):
        shown = "" if inputs is None else f" inputs {inputs[bad][:8].tolist()}"
        raise AssertionError(f"{int(bad.sum())} mismatches:{shown} got {actual[bad][:8].tolist()} "
                             f"expected {expected[bad][:8].tolist()}")


def ml_decode(codes: torch.Tensor, dtype) -> torch.Tensor:
    return torch.from_numpy(codes.numpy().astype(np.uint8).view(dtype).astype(np.float32))


def ml_cast(x: torch.Tensor, dtype) -> torch.Tensor:
    with np.errstate(over="ignore", invalid="ignore"):
        return torch.from_numpy(x.numpy().astype(dtype).astype(np.float32))


def probe_values(fmt: FloatFormat, seed: int = 0) -> torch.Tensor:
    """fp32 inputs that exercise rounding: grid points, every tie and its fp32 neighbours, random
    values across all binades, overflow (including the tie just above max), zeros and infinities."""
    rng = np.random.default_rng(seed)
    v = fmt.values().double().numpy()
    mids = ((v[:-1] + v[1:]) / 2).astype(np.float32)  # exact: fp8 ties have few significant bits
    near = np.concatenate([np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))])
    top_step = fmt.max * 2.0 ** -fmt.mantissa_bits if fmt.mantissa_bits else fmt.max
    lo, hi = math.log(fmt.min_subnormal / 8), math.log(fmt.max * 4)
    mags = np.exp(rng.uniform(lo, hi, 4000)) * rng.choice([-1.0, 1.0], 4000)
    special = [0.0, -0.0, fmt.max, -fmt.max, fmt.max + top_step / 2, -(fmt.max + top_step / 2),
               fmt.max + top_step / 4, fmt.max * 1.5, fmt.max * 1e3, -fmt.max * 1e3, math.inf, -math.inf,
               fmt.min_subnormal / 2, -fmt.min_subnormal / 2, fmt.min_subnormal * 0.5000001,
               fmt.min_subnormal / 3]
    x = np.concatenate([v, mids, near, rng.standard_normal(2000) * fmt.max / 4, mags, special])
    with np.errstate(over="ignore"):
        return torch.from_numpy(x.astype(np.float32))


# --- decode / encode over every code -------------------------------------------------------------

@pytest.mark.parametrize("name,dtype,nosat", ML_DTYPES, ids=ML_IDS)
def test_decode_every_code_matches_ml_dtypes(name, dtype, nosat):
    fmt = get(name)
    codes = fmt.all_codes()
    assert codes.numel() == 2 ** int(fmt.bits) == fmt.num_codes
    assert_same(fmt.decode(codes), ml_decode(codes, dtype), codes)


@pytest.mark.parametrize("name,dtype,nosat", ML_DTYPES, ids=ML_IDS)
def test_constants_match_ml_dtypes_finfo(name, dtype, nosat):
    fmt, info = get(name), ml_dtypes.finfo(dtype)
    assert fmt.max == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.bits == info.bits
    assert fmt.values().max().item() == fmt.max
    assert fmt.values().min().item() == -fmt.max


@pytest.mark.parametrize("name,dtype", TORCH_FLOAT8, ids=[n for n, _ in TORCH_FLOAT8])
def test_decode_every_code_matches_torch_float8(name, dtype):
    fmt = get(name)
    codes = fmt.all_codes()
    expected = codes.to(torch.uint8).view(dtype).float()
    assert_same(fmt.decode(codes), expected, codes)


@pytest.mark.parametrize("name,dtype,nosat", ML_DTYPES, ids=ML_IDS)
def test_encode_inverts_decode_on_finite_codes(name, dtype, nosat):
    fmt = get(name)
    codes = fmt.all_codes()
    values = fmt.decode(codes)
    finite = torch.isfinite(values)
    assert torch.equal(fmt.encode(values[finite]), codes[finite])
    assert fmt.encode(values).dtype == torch.int32


@pytest.mark.parametrize("name,dtype,nosat", ML_DTYPES, ids=ML_IDS)
def test_encode_inverts_decode_on_every_non_nan_code_without_saturation(name, dtype, nosat):
    fmt = get(nosat)
    codes = fmt.all_codes()
    values = fmt.decode(codes)
    ok = ~torch.isnan(values)
    assert torch.equal(fmt.encode(values[ok]), codes[ok])


@pytest.mark.parametrize("name,dtype,nosat", ML_DTYPES, ids=ML_IDS)
def test_encode_nan_gives_a_nan_code_or_refuses(name, dtype, nosat):
    fmt = get(name)
    nan = torch.tensor([math.nan])
    if fmt.has_nan:
        assert torch.isnan(fmt.decode(fmt.encode(nan))).all()
        assert torch.isnan(ml_decode(fmt.encode(nan), dtype)).all()
    else:
        with pytest.raises(ValueError, match="NaN"):
            fmt.encode(nan)


def test_saturating_preset_encodes_infinity_as_max():
    fmt = get("fp8_e5m2")
    inf_codes = torch.tensor([0x7C, 0xFC], dtype=torch.int32)
    assert fmt.decode(inf_codes).tolist() == [math.inf, -math.inf]
    assert fmt.encode(fmt.decode(inf_codes)).tolist() == [0x7B, 0xFB]  # +-57344


def test_values_are_sorted_distinct_and_finite():
    fmt = get("fp8_e4m3")
    v = fmt.values()
    assert v.numel() == 256 - 2 - 1  # two NaN codes, and -0 folds into 0
    assert bool((v[1:] > v[:-1]).all())
    assert bool(torch.isfinite(v).all())


# --- rounding against ml_dtypes ------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype,nosat", ML_DTYPES, ids=ML_IDS)
def test_round_matches_ml_dtypes_cast(name, dtype, nosat):
    fmt = get(nosat)
    x = probe_values(fmt)
    assert_same(fmt.round(x), ml_cast(x, dtype), x)


@pytest.mark.parametrize("name,dtype,nosat", ML_DTYPES, ids=ML_IDS)
def test_round_of_every_tie_goes_to_the_even_code(name, dtype, nosat):
    fmt = get(name)
    v = fmt.values().double()
    mids = ((v[:-1] + v[1:]) / 2).float()
    r = fmt.round(mids)
    codes = fmt.encode(r)
    assert bool(((codes & 1) == 0).all()), mids[(codes & 1) == 1][:8].tolist()
    below, above = v[:-1].float(), v[1:].float()
    assert bool(((r == below) | (r == above)).all())


@pytest.mark.parametrize("name,dtype,nosat", ML_DTYPES, ids=ML_IDS)
def test_preset_saturates_where_ml_dtypes_overflows(name, dtype, nosat):
    fmt, ref = get(name), get(nosat)
    x = probe_values(fmt, seed=1)
    x = x[~torch.isnan(x)]
    unsat = ref.round(x)
    expected = torch.where(torch.isfinite(unsat), unsat, torch.sign(x) * fmt.max)
    assert_same(fmt.round(x), expected, x)
    assert fmt.round(torch.tensor([math.inf, -math.inf])).tolist() == [fmt.max, -fmt.max]


def test_fp8_e4m3_saturation_differs_from_ml_dtypes_by_design():
    x = torch.tensor([500.0, 1e6, math.inf, -500.0])
    assert get("fp8_e4m3").round(x).tolist() == [448.0, 448.0, 448.0, -448.0]
    assert bool(torch.isnan(ml_cast(x, ml_dtypes.float8_e4m3fn)).all())
    assert torch.isnan(get("e4m3_nosat").round(x)).all()
    assert get("fp8_e5m2").round(x[:3]).tolist() == [512.0, 57344.0, 57344.0]
    assert ml_cast(x[:3], ml_dtypes.float8_e5m2).tolist() == [512.0, math.inf, math.inf]


@pytest.mark.parametrize("name,dtype,nosat", ML_DTYPES, ids=ML_IDS)
def test_nan_stays_nan(name, dtype, nosat):
    nan = torch.tensor([math.nan, -math.nan])
    assert torch.isnan(get(name).round(nan)).all()
    assert torch.isnan(get(nosat).round(nan)).all()


def test_nan_without_a_nan_code_differs_from_ml_dtypes_by_design():
    nan = torch.tensor([math.nan])
    assert torch.isnan(get("fp4_e2m1").round(nan)).all()
    ref = ml_cast(nan, ml_dtypes.float4_e2m1fn)
    assert not torch.isnan(ref).any()  # ml_dtypes turns NaN into a number (-0) for float4_e2m1fn
    assert ref.item() == 0.0


# --- rounding against torch ----------------------------------------------------------------------

@pytest.mark.parametrize("name,dtype", TORCH_FLOAT8, ids=[n for n, _ in TORCH_FLOAT8])
def test_round_matches_torch_float8_cast(name, dtype):
    fmt = get(name)
    x = probe_values(fmt, seed=2)
    x = torch.cat([x, torch.tensor([math.nan])])
    assert_same(fmt.round(x), x.to(dtype).float(), x)


def test_torch_e4m3fn_cast_saturates_like_the_mixq_preset():
    x = torch.tensor([500.0, -1e6, math.inf, -math.inf, 464.0, 465.0])
    assert x.to(torch.float8_e4m3fn).float().tolist() == [448.0, -448.0, 448.0, -448.0, 448.0, 448.0]
    assert get("fp8_e4m3").round(x).tolist() == [448.0, -448.0, 448.0, -448.0, 448.0, 448.0]


def random_fp32_bit_patterns(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2 ** 31), 2 ** 31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("name,cast", [("fp16", torch.Tensor.half), ("bf16", torch.Tensor.bfloat16)])
def test_fp16_bf16_match_torch_except_saturation(name, cast):
    fmt, nosat = get(name), get(get(name).name + "_nosat")
    v = fmt.values().double()
    mids = ((v[:-1] + v[1:]) / 2).float()  # every tie between neighbouring values (exact in fp32)
    edges = torch.tensor([65520.0, 65519.99, math.inf, -math.inf])
    x = torch.cat([random_fp32_bit_patterns(100_000, seed=3), mids, edges])
    ref = cast(x).float()
    assert_same(nosat.round(x), ref, x)
    overflow = torch.isinf(ref)
    assert bool(overflow.any())
    expected = torch.where(overflow, torch.sign(x) * fmt.max, ref)
    assert_same(fmt.round(x), expected, x)


def test_fp16_overflow_boundary():
    x = torch.tensor([65504.0, 65519.0, 65520.0, 1e5])
    assert x.half().float().tolist() == [65504.0, 65504.0, math.inf, math.inf]
    assert get("fp16").round(x).tolist() == [65504.0] * 4
    assert get("e5m10_nosat").round(x).tolist() == [65504.0, 65504.0, math.inf, math.inf]


def test_fp32_is_the_identity_on_fp32_inputs_including_subnormals():
    fmt = get("fp32")
    sub = torch.tensor([1e-45, -1e-45, 2 ** -149 * 3, 1e-40, -1.1754942e-38, 0.0, -0.0])
    x = torch.cat([random_fp32_bit_patterns(100_000, seed=4), sub])
    assert bool((x.abs() < 1.1754944e-38).any())
    assert_same(fmt.round(x), x, x)
    assert fmt.min_subnormal == 2.0 ** -149
    assert_same(get("e8m23_nosat").round(torch.tensor([math.inf, -math.inf])),
                torch.tensor([math.inf, -math.inf]))


# --- hand-computed values and custom formats -----------------------------------------------------

def test_fp4_e2m1_grid_and_ties_by_hand():
    fmt = get("fp4_e2m1")
    assert fmt.values().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -5.0, 100.0])
    # ties go to the even mantissa: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    assert fmt.round(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -4.0, 6.0]


def test_e4m3_by_hand():
    fmt = get("fp8_e4m3")
    assert (fmt.max, fmt.min_normal, fmt.min_subnormal) == (448.0, 2.0 ** -6, 2.0 ** -9)
    x = torch.tensor([1.0625, 1.1875, 2.0 ** -10, 2.0 ** -10 * 3, 240.0, 432.0])
    # 1.0625 is the tie of 1 and 1.125 (-> 1); 1.1875 of 1.125 and 1.25 (-> 1.25); 2**-10 of 0 and
    # 2**-9 (-> 0); 3 * 2**-10 of 2**-9 and 2**-8 (-> 2**-8); 432 of 416 and 448 (-> 448)
    assert fmt.round(x).tolist() == [1.0, 1.25, 0.0, 2.0 ** -8, 240.0, 448.0]
    assert fmt.encode(torch.tensor([448.0, -448.0, 1.0, -0.0])).tolist() == [0x7E, 0xFE, 0x38, 0x80]


def brute_force_nearest(fmt: FloatFormat, y: float) -> float:
    """Nearest finite value of ``fmt``, ties to the even code, saturating; by exhaustive search."""
    if not fmt.is_signed:
        y = max(y, 0.0)
    mags = sorted({abs(v) for v in fmt.values().double().tolist()})
    a = abs(y)
    if a >= mags[-1]:
        r = mags[-1]
    else:
        best = min(mags, key=lambda v: abs(v - a))
        ties = [v for v in mags if abs(v - a) == abs(best - a)]
        r = ties[0] if len(ties) == 1 else next(v for v in ties if is_even_code(fmt, v))
    return -r if y < 0 or (y == 0 and math.copysign(1.0, y) < 0) else r


def is_even_code(fmt: FloatFormat, v: float) -> bool:
    if v == 0:
        return True
    e = max(math.floor(math.log2(v)), fmt.emin)
    if fmt.mantissa_bits == 0:
        return (e + fmt.bias) % 2 == 0
    if v < fmt.min_normal and not fmt.subnormals:
        return True
    return (v / 2.0 ** (e - fmt.mantissa_bits)) % 2 == 0


CUSTOM = ["e3m2b5_nosub", "e4m3_nosub", "e2m1", "ue4m3", "ue5m3", "e3m0", "e4m0_none", "e2m2b0", "e5m2_fn"]


@pytest.mark.parametrize("name", CUSTOM)
def test_custom_formats_round_to_the_brute_force_nearest(name):
    fmt = get(name)
    x = probe_values(fmt, seed=5)
    x = x[torch.isfinite(x)][::7]
    expected = torch.tensor([brute_force_nearest(fmt, float(y)) for y in x.tolist()], dtype=torch.float32)
    r = fmt.round(x)
    if fmt.is_signed and fmt.specials != "fnuz":
        assert_same(r, expected, x)
    else:  # no negative zero
        assert bool((r == expected).all()), x[r != expected][:8].tolist()
        assert not bool(torch.signbit(r[r == 0]).any())


def test_nosub_flushes_small_values():
    fmt = get("e3m2b5_nosub")
    assert (fmt.bias, fmt.subnormals) == (5, False)
    assert fmt.min_subnormal == fmt.min_normal == 2.0 ** -4
    v = fmt.values()
    assert v[v > 0].min().item() == 2.0 ** -4
    x = torch.tensor([2.0 ** -5, 2.0 ** -5 * 1.01, 2.0 ** -6])
    assert fmt.round(x).tolist() == [0.0, 2.0 ** -4, 0.0]


def test_unsigned_formats_clamp_negatives_to_zero():
    fmt = get("ue4m3")
    assert not fmt.signed and fmt.bits == 7 and fmt.num_codes == 128  # E4M3 magnitudes without a sign bit
    r = fmt.round(torch.tensor([-3.0, -0.0, -math.inf, 3.0]))
    assert r.tolist() == [0.0, 0.0, 0.0, 3.0]
    assert not bool(torch.signbit(r).any())
    assert fmt.values().tolist() == get("fp8_e4m3").values()[126:].tolist()  # the non-negative E4M3 values
    assert fmt.max == 448.0


def test_fnuz_round_gives_positive_zero():
    for name in ("e4m3fnuz", "e5m2fnuz"):
        r = get(name).round(torch.tensor([-1e-30, -0.0]))
        assert r.tolist() == [0.0, 0.0]
        assert not bool(torch.signbit(r).any()), name


def test_toward_zero_truncates_magnitude():
    fmt = get("fp4_e2m1")
    x = torch.tensor([0.9, 1.49, 2.99, 5.99, -5.99, 100.0, -0.4])
    assert fmt.round(x, Rounding.TOWARD_ZERO).tolist() == [0.5, 1.0, 2.0, 4.0, -4.0, 6.0, -0.0]


@pytest.mark.parametrize("bad", [
    {"exponent_bits": 0, "mantissa_bits": 2},
    {"exponent_bits": 9, "mantissa_bits": 2},
    {"exponent_bits": 3, "mantissa_bits": 24},
    {"exponent_bits": 4, "mantissa_bits": 3, "specials": "x"},
    {"exponent_bits": 1, "mantissa_bits": 2, "specials": "ieee"},
    {"exponent_bits": 4, "mantissa_bits": 3, "specials": "fnuz", "is_signed": False},
    {"exponent_bits": 2, "mantissa_bits": 1, "specials": "none", "saturate": False},
    {"exponent_bits": 8, "mantissa_bits": 23, "bias": 100},
])
def test_invalid_float_formats_are_refused(bad):
    with pytest.raises(ValueError):
        FloatFormat(**bad)
