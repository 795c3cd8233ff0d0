"""Lookup grids (NF4, power grids, ternary, binary, user levels) and the E8M0 exponent format."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from mixq.formats import ExponentFormat, GridFormat, IntFormat, Rounding, get, power_grid

# QLoRA / bitsandbytes NF4 (Dettmers et al. 2023, appendix; bitsandbytes' dequantization table)
NF4_TABLE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


# --- NF4 -----------------------------------------------------------------------------------------

def test_nf4_levels_equal_the_bitsandbytes_table():
    fmt = get("nf4")
    levels = torch.tensor(fmt.levels, dtype=torch.float64)
    assert levels.numel() == 16
    assert (levels - torch.tensor(NF4_TABLE, dtype=torch.float64)).abs().max().item() <= 1e-7
    assert torch.equal(fmt.decode(fmt.all_codes()), torch.tensor(NF4_TABLE, dtype=torch.float32))
    assert (fmt.bits, fmt.num_codes, fmt.max, fmt.signed) == (4.0, 16, 1.0, True)


def test_nf4_rounds_to_the_nearest_level_with_ties_to_even_index():
    fmt = get("nf4")
    t = torch.tensor(NF4_TABLE, dtype=torch.float64)
    mids = ((t[:-1] + t[1:]) / 2).float()
    exact_mid = mids.double() == (t[:-1] + t[1:]) / 2  # ties only where the midpoint is an fp32 number
    idx = fmt.encode(mids)
    lower = torch.arange(15)
    expected_tie = torch.where(lower % 2 == 0, lower, lower + 1)
    assert torch.equal(idx[exact_mid].long(), expected_tie[exact_mid])
    # brute force nearest for random inputs
    x = torch.linspace(-1.2, 1.2, 2001)
    d = (x.double()[:, None] - t[None, :]).abs()
    assert torch.equal(fmt.encode(x).long(), d.argmin(dim=1))
    assert torch.equal(fmt.round(x), t[d.argmin(dim=1)].float())


# --- power grids ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_power_grid_with_exponent_one_is_the_narrow_integer_grid(bits):
    q = 2 ** (bits - 1) - 1
    grid = get(f"pow{bits}_1")
    narrow = IntFormat(bits, narrow=True).values().double() / q
    assert torch.equal(torch.tensor(grid.levels, dtype=torch.float32), narrow.float())
    assert grid.bits == bits and grid.num_codes == 2 * q + 1


def test_power_grid_levels_by_formula():
    grid = get("pow4_1.5")
    i = torch.arange(-7, 8, dtype=torch.float64)
    expected = (torch.sign(i) * (i.abs() / 7) ** 1.5).float()
    assert torch.equal(torch.tensor(grid.levels, dtype=torch.float32), expected)
    assert grid.name == "pow4_1.5" and get(grid.name) == grid
    with pytest.raises(ValueError):
        power_grid(9, 1.0)
    with pytest.raises(ValueError):
        power_grid(4, 0.0)


# --- ternary, binary, user grids -----------------------------------------------------------------

def test_ternary():
    fmt = get("ternary")
    assert fmt.levels == (-1.0, 0.0, 1.0)
    assert fmt.bits == 1.6 and fmt.num_codes == 3
    x = torch.tensor([0.5, -0.5, 0.49, -0.51, 3.0, -3.0, 0.0])
    # 0.5 lies between index 1 (0) and index 2 (+1): the even index 2 wins; -0.5 goes to index 0
    assert fmt.round(x).tolist() == [1.0, -1.0, 0.0, -1.0, 1.0, -1.0, 0.0]
    assert fmt.encode(x).tolist() == [2, 0, 1, 0, 2, 0, 1]


def test_binary_tie_at_zero_goes_to_index_zero():
    fmt = get("binary")
    assert fmt.levels == (-1.0, 1.0) and fmt.bits == 1.0
    assert fmt.round(torch.tensor([0.0, 1e-9, -1e-9, 5.0])).tolist() == [-1.0, 1.0, -1.0, 1.0]


def test_user_grid():
    fmt = get("grid(-1.0,0.0,1.0)")
    assert isinstance(fmt, GridFormat)
    assert fmt.levels == (-1.0, 0.0, 1.0) and fmt.bits == 2.0
    assert get(fmt.name) == fmt
    uneven = GridFormat((0.0, 1.0, 2.0, 3.0, 4.0))
    # ties: 0.5 (idx 0|1) -> 0, 1.5 (1|2) -> 2, 2.5 (2|3) -> 2, 3.5 (3|4) -> 4
    assert uneven.round(torch.tensor([0.5, 1.5, 2.5, 3.5, -7.0, 9.0])).tolist() == [0, 2, 2, 4, 0, 4]
    assert uneven.bits == 3.0 and not uneven.signed
    assert GridFormat((3.0, -1.0, 3.0, 0.5)).levels == (-1.0, 0.5, 3.0)  # sorted, deduplicated
    for bad in [(1.0,), (1.0, 1.0), (0.0, math.inf)]:
        with pytest.raises(ValueError):
            GridFormat(bad)


def test_grid_rounding_modes():
    fmt = GridFormat((-2.0, -0.5, 0.0, 1.0, 4.0))
    x = torch.tensor([-1.9, -0.6, 0.9, 3.9, 9.0, -9.0])
    assert fmt.round(x, Rounding.TOWARD_ZERO).tolist() == [-0.5, -0.5, 0.0, 1.0, 4.0, -2.0]
    u = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    # p(up) from the lower neighbour: -1.9 -> 1/15, -0.6 -> 0.8, 0.9 -> 0.9, 3.9 -> 29/30
    assert fmt.round(x, Rounding.STOCHASTIC, u).tolist() == [-2.0, -0.5, 1.0, 4.0, 4.0, -2.0]


def test_grid_nan_handling():
    fmt = get("nf4")
    assert torch.isnan(fmt.round(torch.tensor([math.nan]))).all()
    with pytest.raises(ValueError, match="NaN"):
        fmt.encode(torch.tensor([math.nan]))


# --- E8M0 ----------------------------------------------------------------------------------------

def test_e8m0_decode_matches_ml_dtypes_and_torch():
    fmt = get("e8m0")
    assert isinstance(fmt, ExponentFormat)
    codes = fmt.all_codes()
    values = fmt.decode(codes)
    ref_ml = codes.numpy().astype(np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    ref_ml = torch.from_numpy(ref_ml)
    ref_torch = codes.to(torch.uint8).view(torch.float8_e8m0fnu).float()
    for ref in (ref_ml, ref_torch):
        assert torch.equal(torch.isnan(values), torch.isnan(ref))
        assert torch.equal(values[:255], ref[:255])
    assert torch.isnan(values[255]) and values[127].item() == 1.0
    assert values[0].item() == 2.0 ** -127 and values[254].item() == 2.0 ** 127
    assert torch.equal(fmt.encode(values[:255]), codes[:255])
    assert fmt.encode(torch.tensor([math.nan])).item() == 255
    assert (fmt.bits, fmt.signed, fmt.max, fmt.min_normal) == (8.0, False, 2.0 ** 127, 2.0 ** -127)


def test_e8m0_round_matches_ml_dtypes_on_normal_fp32_inputs():
    rng = np.random.default_rng(0)
    ks = np.arange(-126, 128, dtype=np.float64)
    powers = 2.0 ** ks
    ties = 1.5 * 2.0 ** ks[:-1]
    special = [1.5 * 2.0 ** 127, 3.4e38, math.inf, 0.0, -0.0, -1.0, -math.inf, math.nan]
    x = np.concatenate([np.exp(rng.uniform(math.log(2.0 ** -126), math.log(3e38), 5000)), powers, ties,
                        np.nextafter(ties.astype(np.float32), np.float32(0)), 2.0 ** ks[:-1] * 1.4999999,
                        special]).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = torch.from_numpy(x.astype(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    ours = get("e8m0_nosat").round(torch.from_numpy(x))
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    assert torch.equal(ours[ok], ref[ok])


def test_e8m0_ties_round_up_and_the_preset_saturates():
    fmt = get("e8m0")
    x = torch.tensor([1.5, 3.0, 0.75, 1.4999999, 2.0 ** -130, 1.5 * 2.0 ** 127, math.inf])
    assert fmt.round(x).tolist() == [2.0, 4.0, 1.0, 1.0, 2.0 ** -127, 2.0 ** 127, 2.0 ** 127]
    assert torch.isnan(get("e8m0_nosat").round(x[-2:])).all()
    assert torch.isnan(fmt.round(torch.tensor([0.0, -1.0, math.nan]))).all()  # no zero, no sign


def test_e8m0_rounds_fp32_subnormal_inputs_to_the_true_nearest():
    # 1.05 * 2**-127 is nearer to 2**-127 than to 2**-126. ml_dtypes and torch decide from the fp32
    # bit pattern and give 2**-126 for such (subnormal) inputs; mixq rounds the value.
    x = torch.tensor([1.05 * 2.0 ** -127, 1.45 * 2.0 ** -127, 1.55 * 2.0 ** -127])
    assert get("e8m0").round(x).tolist() == [2.0 ** -127, 2.0 ** -127, 2.0 ** -126]
    assert x.to(torch.float8_e8m0fnu).float()[0].item() == 2.0 ** -126


def test_e8m0_stochastic_and_toward_zero():
    fmt = get("e8m0")
    x = torch.full((3,), 3.0)  # half way through [2, 4): P(up) = (3 - 2) / (4 - 2) = 0.5
    u = torch.tensor([0.49, 0.5, 0.9], dtype=torch.float64)
    assert fmt.round(x, Rounding.STOCHASTIC, u).tolist() == [2.0, 4.0, 4.0]
    assert fmt.round(torch.tensor([3.9, 1.0]), Rounding.TOWARD_ZERO).tolist() == [2.0, 1.0]


def test_small_exponent_formats():
    fmt = get("e4m0u")
    assert isinstance(fmt, ExponentFormat) and fmt.bias == 7 and fmt.bits == 4
    assert fmt.values().tolist() == [2.0 ** k for k in range(-7, 8)]
    assert get("e4m0ub3").values().tolist() == [2.0 ** k for k in range(-3, 12)]
    with pytest.raises(ValueError):
        ExponentFormat(8, bias=200)
