"""Bit and trit packing against a plain-Python bitstream oracle; every format's packing scheme."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixq.export.pack import (pack_bits, pack_codes, pack_trits, packed_length, packing_scheme, unpack_bits,
                              unpack_codes, unpack_trits)
from mixq.formats import BlockFormat, GridFormat, IntFormat, get, names, power_grid


def oracle_bits(codes: list[int], bits: int) -> bytes:
    """The LSB-first bitstream, one bit at a time."""
    out = bytearray(math.ceil(len(codes) * bits / 8))
    for i, c in enumerate(codes):
        for k in range(bits):
            if (c >> k) & 1:
                pos = i * bits + k
                out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


def oracle_trits(codes: list[int]) -> bytes:
    padded = codes + [0] * (-len(codes) % 5)
    return bytes(sum(t * 3 ** k for k, t in enumerate(padded[i:i + 5])) for i in range(0, len(padded), 5))


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 32))
    codes = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=80))
    return codes, bits


@given(codes_and_bits())
def test_pack_bits_matches_oracle_and_unpacks(case):
    codes, bits = case
    t = torch.tensor(codes, dtype=torch.int64)
    data = pack_bits(t, bits)
    assert data.dtype == torch.uint8 and data.numel() == math.ceil(len(codes) * bits / 8)
    assert bytes(data.tolist()) == oracle_bits(codes, bits)
    back = unpack_bits(data, bits, len(codes))
    assert back.dtype == torch.int32
    expected = [c - (1 << 32) if bits == 32 and c >= 1 << 31 else c for c in codes]  # int32 patterns
    assert back.tolist() == expected


@given(st.lists(st.integers(0, 2), max_size=60))
def test_pack_trits_matches_oracle_and_unpacks(codes):
    data = pack_trits(torch.tensor(codes, dtype=torch.int32))
    assert bytes(data.tolist()) == oracle_trits(codes)
    assert data.numel() == math.ceil(len(codes) / 5)
    assert unpack_trits(data, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", [1, 3, 4, 6, 7, 8, 12, 13, 16, 32])
def test_large_streams_cross_chunks(bits):
    """Streams longer than one chunk of the general path, every width, against the oracle on a slice."""
    g = torch.Generator().manual_seed(bits)
    n = (1 << 20) + 51
    c = torch.randint(0, 1 << min(bits, 62), (n,), generator=g, dtype=torch.int64) & ((1 << bits) - 1)
    data = pack_bits(c, bits)
    assert torch.equal(unpack_bits(data, bits, n).to(torch.int64) & ((1 << bits) - 1), c)
    tail = c[-43:].tolist()  # the last 43 codes start on a byte boundary (n - 43 is a multiple of 8)
    assert bytes(data[(n - 43) * bits // 8:].tolist()) == oracle_bits(tail, bits)


def test_int32_patterns_for_32_bits():
    c = torch.tensor([0, -1, -(1 << 31), (1 << 31) - 1, 0x3F800000], dtype=torch.int32)  # fp32 patterns
    assert torch.equal(unpack_bits(pack_bits(c, 32), 32, 5), c)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 2\*\*4\)"):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*4\)"):
        pack_bits(torch.tensor([-1]), 4)
    with pytest.raises(TypeError):
        pack_bits(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="bit width"):
        pack_bits(torch.tensor([1]), 33)
    with pytest.raises(ValueError, match="trits"):
        pack_trits(torch.tensor([3]))


def test_damaged_streams_are_refused():
    data = pack_bits(torch.tensor([1, 2, 3]), 3)  # 9 bits: 2 bytes
    with pytest.raises(ValueError, match="2 bytes, got 1"):
        unpack_bits(data[:1], 3, 3)
    bad = data.clone()
    bad[-1] |= 0x80  # a padding bit
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(bad, 3, 3)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(data.to(torch.int32), 3, 3)
    with pytest.raises(ValueError, match="242"):
        unpack_trits(torch.tensor([243], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="padding"):
        unpack_trits(torch.tensor([81], dtype=torch.uint8), 4)  # the 5th trit is 1
    with pytest.raises(ValueError, match="holds code 15"):  # a 15-level grid in 4 bits
        unpack_codes(pack_bits(torch.tensor([15]), 4), power_grid(4, 1.5), 1)


def _scalar_formats():
    out = {}
    for name in names():
        fmt = get(name)
        out[name] = fmt
        if isinstance(fmt, BlockFormat):
            out[f"{name}.element"], out[f"{name}.scale"] = fmt.element, fmt.scale
            if fmt.tensor_scale is not None:
                out[f"{name}.tensor_scale"] = fmt.tensor_scale
    for extra in ("int1", "uint1", "int4n", "pow4_1.5", "pow3_2", "grid(-1,0,1)", "grid(-2,-1,0,1,2)",
                  "e5m2b12", "e4m0u", "int12", "uint16", "int16"):
        out[extra] = get(extra)
    # fp32 (also NVFP4's tensor scale) has too many codes to enumerate: its 32-bit patterns are tested above
    return {k: v for k, v in out.items() if not isinstance(v, BlockFormat) and v.num_codes <= 1 << 16}


@pytest.mark.parametrize("name, fmt", sorted(_scalar_formats().items()), ids=lambda v: str(v))
def test_every_code_of_every_format_round_trips(name, fmt):
    scheme = packing_scheme(fmt)
    per_value = 1.6 if scheme == "trits" else int(scheme[4:])
    assert per_value == fmt.bits  # the accounting width
    codes = fmt.all_codes()
    codes = codes[torch.randperm(codes.numel(), generator=torch.Generator().manual_seed(0))]
    data = pack_codes(codes, fmt)
    assert data.numel() == packed_length(codes.numel(), scheme) == math.ceil(codes.numel() * fmt.bits / 8)
    assert torch.equal(unpack_codes(data, fmt, codes.numel()), codes)
    v, back = fmt.decode(codes), fmt.decode(unpack_codes(data, fmt, codes.numel()))
    assert torch.equal(v.isnan(), back.isnan()) and torch.equal(v.nan_to_num().view(torch.int32),
                                                                back.nan_to_num().view(torch.int32))


def test_schemes():
    assert packing_scheme(get("ternary")) == "trits"
    assert packing_scheme(GridFormat((-1.0, 0.0, 1.0))) == "bits2"  # an unlabelled 3-level grid counts 2 bits
    assert packing_scheme(get("nf4")) == "bits4"
    assert packing_scheme(get("e8m0")) == "bits8"
    assert packing_scheme(get("fp32")) == "bits32"
    assert packing_scheme(IntFormat(1)) == "bits1"
    with pytest.raises(ValueError, match="cannot be packed"):
        packing_scheme(GridFormat((-1.0, -0.5, 0.0, 0.5, 1.0), bit_width=2.0))
