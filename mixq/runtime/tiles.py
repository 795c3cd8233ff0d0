"""Row-wise dense bit packing of element codes, unpacked one tile of rows at a time; the GEMM helpers.

Layout (``pack_rows``): a code matrix ``[R, C]`` (ints in ``[0, 2**bits)``) becomes ``uint8 [R, B]``
with ``B = ceil(C / 8) * bits``: each row is an LSB-first bitstream of its codes (code ``j`` of a
row occupies bits ``j*bits .. j*bits + bits - 1`` of that row's stream), padded with zero codes to a
multiple of 8 codes, so that every row starts on a byte boundary and a tile of rows is a contiguous
slice. For ``C % 8 == 0`` (every real weight) there is no padding and the bytes are exactly
``R * C * bits / 8``; otherwise each row carries ``(-C) % 8`` padding codes, reported by
:func:`row_padding_bits`.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch
from torch import Tensor

_BITS = range(1, 9)
EXACT_K = 1024  # |int8 * int8| <= 2**14, so 1024-term partial sums stay exact in fp32 (<= 2**24)
INT_BACKENDS = ("int_mm", "fp32_exact")


def _check_bits(bits: int) -> None:
    if bits not in _BITS:
        raise ValueError(f"row packing holds codes of 1 to 8 bits, got {bits!r}")


def packed_row_bytes(cols: int, bits: int) -> int:
    """Bytes of one packed row of ``cols`` codes of ``bits`` bits."""
    _check_bits(bits)
    return -(-cols // 8) * bits


def row_padding_bits(cols: int, bits: int) -> int:
    """Padding bits per packed row (zero when ``cols`` is a multiple of 8)."""
    return ((-cols) % 8) * bits


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes`` (int ``[R, C]``, values in ``[0, 2**bits)``) into ``uint8 [R, packed_row_bytes]``."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_rows needs a [rows, cols] code matrix, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing, "
                         f"found [{int(c.min())}, {int(c.max())}]")
    R, C = c.shape
    pad = (-C) % 8
    if pad:
        c = torch.cat([c, c.new_zeros(R, pad)], dim=1)
    octets = c.reshape(R, -1, 8)  # [R, C8, 8]: 8 codes fill exactly `bits` bytes
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (octets << shifts).sum(dim=-1)  # [R, C8] int64 holding 8*bits <= 64 bits (no overlap)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    data = (word[..., None] >> byte_shifts) & 0xFF  # [R, C8, bits]
    return data.to(torch.uint8).reshape(R, -1).contiguous()


def unpack_rows(data: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_rows` for a tile: ``uint8 [T, B]`` -> ``int64 [T, cols]`` codes.

    Widths dividing 8 (1, 2, 4, 8) take a byte-local path; 3, 5, 6, 7 rebuild each 8-code word.
    """
    _check_bits(bits)
    T, B = data.shape
    if bits == 8:
        return data[:, :cols].to(torch.int64)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
        codes = (data[..., None] >> shifts) & mask  # [T, B, per_byte] uint8
        return codes.reshape(T, B * per_byte)[:, :cols].to(torch.int64)
    octets = data.reshape(T, B // bits, bits).to(torch.int64)  # [T, C8, bits]
    word = (octets << (torch.arange(bits, dtype=torch.int64) * 8)).sum(dim=-1)  # [T, C8]
    codes = (word[..., None] >> (torch.arange(8, dtype=torch.int64) * bits)) & mask  # [T, C8, 8]
    return codes.reshape(T, B // bits * 8)[:, :cols]


def int_matmul(xq: Tensor, wq: Tensor, backend: str) -> Tensor:
    """``xq [M, K] int8 @ wq [N, K] int8 ^T`` -> ``int32 [M, N]``, exact.

    ``backend``: ``int_mm`` (``torch._int_mm``) or ``fp32_exact`` (fp32 BLAS over K-chunks of
    ``EXACT_K``, exact because every partial sum is an integer below 2**24; the same int32 result).
    """
    if backend == "int_mm":
        return torch._int_mm(xq, wq.t())  # on CPU any M works (CUDA needs M > 16)
    acc = None
    for k0 in range(0, xq.shape[1], EXACT_K):
        part = xq[:, k0:k0 + EXACT_K].float() @ wq[:, k0:k0 + EXACT_K].float().t()  # exact integers
        acc = part.to(torch.int32) if acc is None else acc + part.to(torch.int32)
    return acc


@functools.lru_cache(maxsize=1)
def _gemv_module():
    """The fused unpack + dot kernel module (numba), or None without numba. numba's first parallel
    launch resets torch's OpenMP pool size (shared runtime): one tiny launch, then torch's is restored."""
    if importlib.util.find_spec("numba") is None:
        return None
    from mixq.runtime import _numba_gemv

    threads = torch.get_num_threads()
    one = np.ones((1, 8), np.float32)
    zero = np.zeros(1, np.float32)
    _numba_gemv.gemv(one, np.zeros((1, 8), np.uint8), np.ones(256, np.float32), 1, np.ones(1, np.float32),
                     zero, zero, 0.0, 0, 8, False, np.zeros((1, 1), np.float32))
    torch.set_num_threads(threads)
    return _numba_gemv


def gemv_kernels():
    """The fused unpack + dot kernels (``mixq.runtime._numba_gemv``), or None without numba, with
    numba's thread count capped at torch's (idle extra threads spin on a shared machine)."""
    module = _gemv_module()
    if module is not None:
        import numba

        numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    return module
