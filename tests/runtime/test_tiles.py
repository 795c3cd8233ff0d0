"""Row-wise bit packing: pack/unpack identity for every width 1..8, byte counts, padding, refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixq.runtime import tiles


@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_identity(bits: int, rows: int, cols: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g)
    data = tiles.pack_rows(codes, bits)
    assert data.dtype == torch.uint8
    assert tuple(data.shape) == (rows, tiles.packed_row_bytes(cols, bits))
    assert torch.equal(tiles.unpack_rows(data, bits, cols), codes)
    # a tile of rows is a contiguous slice that unpacks on its own
    assert torch.equal(tiles.unpack_rows(data[1:], bits, cols), codes[1:])


@pytest.mark.parametrize("bits", range(1, 9))
def test_dense_bytes_without_padding(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (3, 64))
    assert tiles.pack_rows(codes, bits).numel() == 3 * 64 * bits // 8
    assert tiles.row_padding_bits(64, bits) == 0
    assert tiles.row_padding_bits(63, bits) == bits


def test_lsb_first_layout() -> None:
    # codes 1, 2 of 4 bits: first code in the low nibble
    assert tiles.pack_rows(torch.tensor([[1, 2, 0, 0, 0, 0, 0, 0]]), 4)[0, 0].item() == 0x21
    # 3-bit codes 0b101, 0b011 -> bits 0..2 = 101, bits 3..5 = 011 -> 0b011101
    assert tiles.pack_rows(torch.tensor([[5, 3, 0, 0, 0, 0, 0, 0]]), 3)[0, 0].item() == 0b011101


def test_refusals() -> None:
    with pytest.raises(ValueError, match="1 to 8 bits"):
        tiles.pack_rows(torch.zeros(2, 8, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        tiles.pack_rows(torch.full((2, 8), 16), 4)
    with pytest.raises(ValueError, match="rows, cols"):
        tiles.pack_rows(torch.zeros(8, dtype=torch.int64), 4)
