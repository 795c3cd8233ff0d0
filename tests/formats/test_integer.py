"""Integer formats: ranges, two's complement codes, round half to even, saturation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixq.formats import IntFormat, Rounding, get

WIDTHS = list(range(1, 17))


@pytest.mark.parametrize("b", WIDTHS)
def test_signed_range_and_every_code(b):
    fmt = IntFormat(b)
    lo, hi = -(2 ** (b - 1)), 2 ** (b - 1) - 1
    assert (fmt.qmin, fmt.qmax, fmt.max, fmt.num_codes, fmt.bits) == (lo, hi, float(hi), 2 ** b, float(b))
    assert fmt.values().tolist() == list(range(lo, hi + 1))
    codes = fmt.all_codes()
    values = fmt.decode(codes)
    # two's complement: code c is c below 2**(b-1), c - 2**b above
    expected = torch.where(codes >= 2 ** (b - 1), codes - 2 ** b, codes).float()
    assert torch.equal(values, expected)
    assert torch.equal(fmt.encode(values), codes)


@pytest.mark.parametrize("b", WIDTHS)
def test_unsigned_range_and_every_code(b):
    fmt = IntFormat(b, is_signed=False)
    assert (fmt.qmin, fmt.qmax, fmt.signed) == (0, 2 ** b - 1, False)
    codes = fmt.all_codes()
    assert torch.equal(fmt.decode(codes), codes.float())
    assert torch.equal(fmt.encode(codes.float()), codes)


@pytest.mark.parametrize("b", range(2, 17))
def test_narrow_range_drops_the_most_negative_code(b):
    fmt = IntFormat(b, narrow=True)
    hi = 2 ** (b - 1) - 1
    assert (fmt.qmin, fmt.qmax) == (-hi, hi)
    assert fmt.values().tolist() == list(range(-hi, hi + 1))
    assert torch.isnan(fmt.decode(torch.tensor([2 ** (b - 1)]))).all()  # the pattern of -2**(b-1)
    assert fmt.round(torch.tensor([-1e9, -hi - 0.5])).tolist() == [-hi, -hi]
    codes = fmt.all_codes()
    values = fmt.decode(codes)
    ok = ~torch.isnan(values)
    assert torch.equal(fmt.encode(values[ok]), codes[ok])


def test_int8_codes_are_numpy_twos_complement():
    fmt = get("int8")
    v = np.arange(-128, 128, dtype=np.int8)
    codes = fmt.encode(torch.from_numpy(v.astype(np.float32)))
    assert codes.tolist() == v.view(np.uint8).astype(np.int64).tolist()


def test_int4_codes_by_hand():
    fmt = get("int4")
    assert fmt.encode(torch.tensor([0.0, 1.0, 7.0, -1.0, -8.0, -7.0])).tolist() == [0, 1, 7, 15, 8, 9]


def test_round_half_to_even():
    fmt = get("int4")
    assert fmt.round(torch.tensor([0.5, 1.5, 2.5])).tolist() == [0.0, 2.0, 2.0]
    x = torch.tensor([-0.5, -1.5, -2.5, 3.5, 0.49999997, 0.50000006])
    assert fmt.round(x).tolist() == [0, -2, -2, 4, 0, 1]


def test_saturation_and_nan():
    fmt = get("int4")
    x = torch.tensor([7.4, 7.5, 8.0, 100.0, math.inf, -8.4, -8.6, -100.0, -math.inf])
    assert fmt.round(x).tolist() == [7, 7, 7, 7, 7, -8, -8, -8, -8]
    assert fmt.encode(torch.tensor([1e6, -1e6])).tolist() == [7, 8]
    assert torch.isnan(fmt.round(torch.tensor([math.nan]))).all()
    with pytest.raises(ValueError, match="NaN"):
        fmt.encode(torch.tensor([1.0, math.nan]))


def test_unsigned_saturates_negatives_to_zero():
    fmt = get("uint4")
    assert fmt.round(torch.tensor([-3.0, 2.5, 15.6, 99.0])).tolist() == [0, 2, 15, 15]


def test_int1_and_its_constraints():
    fmt = IntFormat(1)
    assert fmt.values().tolist() == [-1.0, 0.0]
    assert IntFormat(1, is_signed=False).values().tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        IntFormat(1, narrow=True)
    with pytest.raises(ValueError):
        IntFormat(4, is_signed=False, narrow=True)
    for bad in (0, 17):
        with pytest.raises(ValueError):
            IntFormat(bad)


def test_toward_zero_and_stochastic_rounding_modes():
    fmt = get("int8")
    x = torch.tensor([2.7, -2.7, 200.0, -200.0])
    assert fmt.round(x, Rounding.TOWARD_ZERO).tolist() == [2, -2, 127, -128]
    u = torch.tensor([0.0, 0.29, 0.31, 0.99], dtype=torch.float64)
    # P(up) = fraction: 2.7 rounds up exactly when u >= 0.3
    assert fmt.round(torch.full((4,), 2.7), Rounding.STOCHASTIC, u).tolist() == [2, 2, 3, 3]
    assert fmt.round(torch.full((4,), 3.0), Rounding.STOCHASTIC, u).tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="uniform"):
        fmt.round(x, Rounding.STOCHASTIC)
    with pytest.raises(ValueError, match="shape"):
        fmt.round(x, Rounding.STOCHASTIC, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name,expected", [("int2", IntFormat(2)), ("int16", IntFormat(16)),
                                           ("uint8", IntFormat(8, is_signed=False)),
                                           ("int4n", IntFormat(4, narrow=True)), ("INT8", IntFormat(8))])
def test_integer_names(name, expected):
    fmt = get(name)
    assert fmt == expected
    assert get(fmt.name) == fmt


def test_min_normal_is_the_smallest_positive_value():
    assert get("int4").min_normal == get("int4").min_subnormal == 1.0
    assert IntFormat(1).min_normal == 0.0  # int1 holds only -1 and 0
