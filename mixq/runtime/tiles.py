"""Row-wise dense bit packing of element codes, unpacked one tile of rows at a time; the GEMM helpers.

Layout (``pack_rows``): a code matrix ``[R, C]`` (ints in ``[0, 2**bits)``) becomes ``uint8 [R, B]``
with ``B = ceil(C / 8) * bits``: each row is an LSB-first bitstream of its codes (code ``j`` of a
row occupies bits ``j*bits .. j*bits + bits - 1`` of that row's stream), padded with zero codes to a
multiple of 8 codes, so that every row starts on a byte boundary and a tile of rows is a contiguous
slice. For ``C % 8 == 0`` (every real weight) there is no padding and the bytes are exactly
``R * C * bits / 8``; otherwise each row carries ``(-C) % 8`` padding codes, reported by
:func:`row_padding_bits`.

Integer GEMMs (:func:`int_matmul`, :class:`OneDNNWeight`) all return the exact accumulator ``xq @ wq^T``.
oneDNN's u8 x s8 kernel is exact only for activations of at most 7 bits: without VNNI (AVX2, AVX-512
before Cascade Lake) it multiplies with ``vpmaddubsw``, which adds two u8 x s8 products into a
*saturating* int16, and ``2 * 255 * 128 > 32767``. Codes in ``[-64, 63]`` shifted to u8 ``[0, 127]``
(zero point 64) keep every pair within ``2 * 127 * 128 = 32512``, for any int8 weight.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch
from torch import Tensor

from mixq.export.pack import pack_bits

_BITS = range(1, 9)
EXACT_K = 1024  # |int8 * int8| <= 2**14, so 1024-term partial sums stay exact in fp32 (<= 2**24)
INT_BACKENDS = ("int_mm", "fp32_exact")
FP32_EXACT_MAX = 1 << 24  # every integer of magnitude <= 2**24 is an fp32 value
INT16_MAX = 32767  # oneDNN's u8 x s8 pair sums saturate here on CPUs without VNNI


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
    """Pack ``codes`` (int ``[R, C]``, values in ``[0, 2**bits)``) into ``uint8 [R, packed_row_bytes]``.

    Each row is :func:`mixq.export.pack.pack_bits`'s LSB-first stream of its codes, padded with zero
    codes to a multiple of 8 (8 codes fill exactly ``bits`` bytes), so rows start on byte boundaries.
    """
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_rows needs a [rows, cols] code matrix, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing, "
                         f"found [{int(c.min())}, {int(c.max())}]")
    R, C = c.shape
    padded = torch.nn.functional.pad(c, (0, (-C) % 8))  # [R, C8 * 8]
    return pack_bits(padded, bits).reshape(R, packed_row_bytes(C, bits)).contiguous()


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


def onednn_fits(x_qmin: int, x_qmax: int, w_absmax: int = 128) -> bool:
    """Whether activation codes ``[x_qmin, x_qmax]`` times weight codes of magnitude ``<= w_absmax`` are
    exact in oneDNN's u8 x s8 kernel.

    Without VNNI it sums pairs of u8 x s8 products in int16 (``vpmaddubsw``, saturating): with the u8
    activations ``x - x_qmin`` in ``[0, x_qmax - x_qmin]`` every pair stays exact while
    ``2 (x_qmax - x_qmin) w_absmax <= 32767``: 7-bit inputs with any int8 weight (2 * 127 * 128), or
    8-bit inputs with weights of at most 7 bits (2 * 255 * 64).
    """
    span = x_qmax - x_qmin
    return 0 <= span <= 255 and 2 * span * w_absmax <= INT16_MAX


def onednn_chunk(x_absmax: int, w_absmax: int) -> int:
    """Largest K whose products of codes bounded by ``x_absmax``, ``w_absmax`` sum below 2**24 in magnitude.

    oneDNN returns the int32 accumulator as fp32 (it has no int32 output): exact while ``|acc| <= 2**24``.
    int7 x int8: ``2**24 / (64 * 128) = 2048``; int6 x int8: 4096."""
    return max(1, FP32_EXACT_MAX // max(1, x_absmax * w_absmax))


def _onednn_ops():
    """``torch.ops.onednn`` when it has the int8 prepack and pointwise linear ops, else None."""
    try:
        ops = torch.ops.onednn
        ops.qlinear_prepack, ops.qlinear_pointwise  # noqa: B018 (lookups raise when missing)
    except (AttributeError, RuntimeError):
        return None
    return ops


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """oneDNN's u8 x s8 linear exists on this CPU build and gives exact accumulators on extreme 7-bit codes.

    A one-time self-test (K = 2048: the largest chunk, saturating pairs if anything wider slipped in,
    ``|acc| = 2**24``) against an int64 matmul; any failure means: use the fp32_exact backend."""
    if _onednn_ops() is None or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    for (x_lo, x_hi), w_lo in (((-64, 63), -128), ((-128, 127), -64)):  # int7 x int8, int8 x int7
        K = onednn_chunk(-x_lo, -w_lo)
        xq = torch.randint(x_lo, x_hi + 1, (5, K), generator=g, dtype=torch.int8)
        wq = torch.randint(w_lo, -w_lo, (7, K), generator=g, dtype=torch.int8)
        xq[0], xq[1], xq[2, 0::2], wq[0], wq[1] = x_lo, x_hi, x_hi, w_lo, -w_lo - 1  # |acc| = 2**24 at [0, 0]
        try:
            acc = OneDNNWeight(wq, K).matmul_u8(u8_from_codes(xq, -x_lo), -x_lo)
        except RuntimeError:
            return False
        if not torch.equal(acc.to(torch.int64), xq.to(torch.int64) @ wq.to(torch.int64).t()):
            return False
    return True


def u8_from_codes(xq: Tensor, zero_point: int) -> Tensor:
    """int8 codes ``>= -zero_point`` -> the uint8 activations ``xq + zero_point`` of :meth:`OneDNNWeight.matmul_u8`."""
    return (xq.to(torch.int16) + zero_point).to(torch.uint8)


class OneDNNWeight:
    """An int8 weight ``[N, K]`` prepacked for oneDNN's u8 x s8 linear, in K-chunks of ``chunk`` columns.

    The prepacked tensors are oneDNN's blocked copies of the codes (opaque tensors of ``K * N`` int8,
    about ``K * N`` bytes of memory: RSS grew by 1.002-1.017x that on 576x1536 and 4096x4096 weights);
    :meth:`codes` rebuilds the plain ``[N, K]`` int8 codes from them exactly. Opaque tensors have no
    storage that torch can copy or pickle, so ``deepcopy`` and pickling go through :meth:`codes`.
    """

    def __init__(self, codes: Tensor, chunk: int) -> None:
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"OneDNNWeight needs int8 [N, K] codes, got {codes.dtype} {tuple(codes.shape)}")
        ops = _onednn_ops()
        if ops is None:
            raise RuntimeError("torch.ops.onednn.qlinear_prepack / qlinear_pointwise are not available")
        self.out_features, self.in_features = codes.shape
        self.chunk = int(chunk)
        self.parts = [ops.qlinear_prepack(codes[:, k0:k0 + self.chunk].contiguous(), None)
                      for k0 in range(0, self.in_features, self.chunk)]  # each [k, N] opaque int8
        self.w_scale = torch.ones(self.out_features)  # [N] oneDNN's per-channel weight scale: 1
        self.w_zero = torch.zeros(self.out_features, dtype=torch.int64)  # [N]

    def nbytes(self) -> int:
        """Bytes of the prepacked copies (their logical ``K * N`` int8; see the class docstring)."""
        return sum(p.numel() * p.element_size() for p in self.parts)

    def codes(self) -> Tensor:
        """The int8 codes ``[N, K]``, rebuilt from the prepacked copies (exact)."""
        return torch.cat([p.to_dense().t() for p in self.parts], dim=1).contiguous()

    def matmul_u8(self, xu: Tensor, zero_point: int, dtype: torch.dtype = torch.int32) -> Tensor:
        """``xu [M, K]`` uint8 (codes + ``zero_point``; see :func:`onednn_fits` for the codes that are exact)
        -> the exact accumulator ``(xu - zero_point) @ codes^T`` ``[M, N]``: int32, or with
        ``dtype=torch.float32`` that int32 converted to
        fp32 (one chunk: oneDNN's fp32 output itself, whose integers are below 2**24, hence the same).
        Chunks are added in int32."""
        ops = torch.ops.onednn
        acc = None
        for i, p in enumerate(self.parts):
            x = xu if len(self.parts) == 1 else xu[:, i * self.chunk:(i + 1) * self.chunk].contiguous()
            y = ops.qlinear_pointwise(x, 1.0, zero_point, p, self.w_scale, self.w_zero, None, 1.0, 0,
                                      torch.float32, "none", [], "")  # [M, N] fp32 exact integers
            if len(self.parts) == 1 and dtype == torch.float32:
                return y
            acc = y.to(torch.int32) if acc is None else acc + y.to(torch.int32)
        return acc.to(dtype)

    def __deepcopy__(self, memo: dict) -> "OneDNNWeight":
        return OneDNNWeight(self.codes(), self.chunk)

    def __getstate__(self) -> dict:
        return {"codes": self.codes(), "chunk": self.chunk}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["codes"], state["chunk"])


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
