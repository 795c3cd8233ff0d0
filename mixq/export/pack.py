"""Dense bit packing of integer codes: any width from 1 to 32 bits, and ternary 5 trits per byte.

Layouts (both exact, both with the accounting bits per value of :mod:`mixq.quant.accounting`):

``bits{b}``  code ``i`` occupies bits ``i*b .. i*b+b-1`` of one little-endian bitstream, least
             significant bit first; the stream is ``ceil(n*b/8)`` bytes (uint8), the unused high bits
             of the last byte are zero.
``trits``    codes in {0, 1, 2}, five per byte: ``byte = t0 + 3*t1 + 9*t2 + 27*t3 + 81*t4`` (<= 242);
             ``ceil(n/5)`` bytes, missing trits of the last byte are 0.

The unpackers check lengths, padding and code ranges, so a damaged stream raises ``ValueError``
instead of decoding to other numbers.
"""

from __future__ import annotations

import math

import torch

from mixq.formats import ScalarFormat

MAX_BITS = 32
TRITS = "trits"
TRITS_PER_BYTE = 5
_WORD_BITS = 63  # a byte period of at most this many bits is packed through int64 words
_CHUNK = 1 << 20  # codes per step (a multiple of 8): bounds the temporary bit matrix to 32 MiB
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
_BYTE_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bit width must be an integer 1..{MAX_BITS}, got {bits!r}")


def packed_length(numel: int, scheme: str) -> int:
    """Bytes that ``numel`` codes take in ``scheme`` (``bits{b}`` or ``trits``)."""
    if scheme == TRITS:
        return math.ceil(numel / TRITS_PER_BYTE)
    return math.ceil(numel * _scheme_bits(scheme) / 8)


def _scheme_bits(scheme: str) -> int:
    if not scheme.startswith("bits") or not scheme[4:].isdigit():
        raise ValueError(f"unknown packing scheme {scheme!r}; expected 'trits' or 'bits<b>'")
    bits = int(scheme[4:])
    _check_bits(bits)
    return bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, read in row-major order) into a uint8 ``[ceil(n*bits/8)]`` stream.

    Codes must lie in ``[0, 2**bits)``; for ``bits == 32`` int32 codes are taken as their two's
    complement bit patterns (fp32 scale codes are such patterns).
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    c = codes.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
    if bits == 32 and codes.dtype == torch.int32:
        c = c & 0xFFFFFFFF
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, 2**{bits}), got values in [{int(c.min())}, {int(c.max())}]")
    if math.lcm(bits, 8) <= _WORD_BITS:
        return _pack_words(c, bits)
    return _pack_bit_matrix(c, bits)


def _pack_words(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``c`` (int64 ``[n]``) in groups of ``g`` filling ``lcm(bits, 8)`` bits, one int64 word each."""
    word_bits = math.lcm(bits, 8)
    g = word_bits // bits
    n = c.numel()
    groups = torch.nn.functional.pad(c, (0, -n % g)).reshape(-1, g)  # [W, g]
    word = (groups << (bits * torch.arange(g, dtype=torch.int64))).sum(dim=1)  # [W] disjoint bits: sum = or
    stream = (word[:, None] >> (8 * torch.arange(word_bits // 8, dtype=torch.int64))) & 0xFF  # [W, bytes]
    return stream.reshape(-1)[:packed_length(n, f"bits{bits}")].to(torch.uint8)


def _pack_bit_matrix(c: torch.Tensor, bits: int) -> torch.Tensor:
    """The general path (widths whose byte period exceeds a word): one byte per bit, chunk by chunk."""
    n = c.numel()
    out = torch.empty(packed_length(n, f"bits{bits}"), dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    for start in range(0, n, _CHUNK):  # chunks of whole bytes: _CHUNK * bits is a multiple of 8
        part = c[start:start + _CHUNK]
        stream = ((part[:, None] >> shifts) & 1).to(torch.int32).reshape(-1)  # [len * bits] LSB first
        stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
        first = start * bits // 8
        packed = (stream.reshape(-1, 8) * _BYTE_WEIGHTS).sum(dim=1)  # [bytes]
        out[first:first + packed.numel()] = packed.to(torch.uint8)
    return out


def unpack_bits(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Codes (int32 ``[numel]``) of a stream written by :func:`pack_bits`; 32-bit codes come back as
    their int32 two's complement patterns. Raises ``ValueError`` on a wrong length or non-zero padding."""
    _check_bits(bits)
    data = _checked_stream(data, packed_length(numel, f"bits{bits}"), f"bits{bits}", numel)
    if math.lcm(bits, 8) <= _WORD_BITS:
        out = _unpack_words(data, bits, numel)
    else:
        out = _unpack_bit_matrix(data, bits, numel)
    if numel * bits % 8:
        used = numel * bits % 8
        if int(data[-1]) >> used:
            raise ValueError(f"bits{bits} stream of {numel} codes: the padding bits of the last byte "
                             "are not zero")
    if bits == 32:
        out = torch.where(out >= 1 << 31, out - (1 << 32), out)
    return out.to(torch.int32)


def _unpack_words(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    word_bits = math.lcm(bits, 8)
    g, nbytes = word_bits // bits, word_bits // 8
    stream = torch.nn.functional.pad(data.to(torch.int64), (0, -data.numel() % nbytes)).reshape(-1, nbytes)
    word = (stream << (8 * torch.arange(nbytes, dtype=torch.int64))).sum(dim=1)  # [W]
    codes = (word[:, None] >> (bits * torch.arange(g, dtype=torch.int64))) & ((1 << bits) - 1)  # [W, g]
    return codes.reshape(-1)[:numel]


def _unpack_bit_matrix(data: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.int64)
    shifts = torch.arange(bits, dtype=torch.int64)
    byte_shifts = torch.arange(8, dtype=torch.int32)
    for start in range(0, numel, _CHUNK):
        count = min(_CHUNK, numel - start)
        first = start * bits // 8
        chunk = data[first:first + math.ceil(count * bits / 8)].to(torch.int32)
        stream = ((chunk[:, None] >> byte_shifts) & 1).reshape(-1)[:count * bits]  # [count * bits]
        out[start:start + count] = (stream.reshape(count, bits).to(torch.int64) << shifts).sum(dim=1)
    return out


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes in {0, 1, 2} (any shape, row-major) five per byte: uint8 ``[ceil(n/5)]``."""
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    c = codes.detach().reshape(-1).to(device="cpu", dtype=torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 2):
        raise ValueError(f"trits must lie in {{0, 1, 2}}, got values in [{int(c.min())}, {int(c.max())}]")
    c = torch.nn.functional.pad(c, (0, -c.numel() % TRITS_PER_BYTE))
    return (c.reshape(-1, TRITS_PER_BYTE) * _POW3).sum(dim=1).to(torch.uint8)


def unpack_trits(data: torch.Tensor, numel: int) -> torch.Tensor:
    """Codes (int32 ``[numel]``) of a stream written by :func:`pack_trits`; ``ValueError`` on a wrong
    length, a byte above 242 or non-zero padding trits."""
    data = _checked_stream(data, packed_length(numel, TRITS), TRITS, numel).to(torch.int32)
    if data.numel() and int(data.max()) > 242:
        raise ValueError(f"trits stream holds byte {int(data.max())}; five trits make at most 242")
    trits = (data[:, None] // _POW3) % 3  # [bytes, 5]
    flat = trits.reshape(-1)
    if bool(flat[numel:].any()):
        raise ValueError(f"trits stream of {numel} codes: the padding trits of the last byte are not zero")
    return flat[:numel].contiguous()


def _checked_stream(data: torch.Tensor, length: int, scheme: str, numel: int) -> torch.Tensor:
    if not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative integer, got {numel!r}")
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"a packed stream is a 1-D uint8 tensor, got {data.dtype} of shape "
                         f"{tuple(data.shape)}")
    if data.numel() != length:
        raise ValueError(f"{scheme} stream of {numel} codes must be {length} bytes, got {data.numel()}")
    return data.detach().cpu()


def packing_scheme(fmt: ScalarFormat) -> str:
    """How codes of ``fmt`` are stored: ``trits`` (1.6 bits per value) or ``bits{b}``.

    The scheme's bits per value equal ``fmt.bits`` (the accounting width), so packed sizes agree with
    :func:`mixq.quant.accounting.bit_count`; a format whose codes do not fit its accounting width raises.
    """
    if fmt.num_codes <= 3 and fmt.bits == 8 / TRITS_PER_BYTE:
        return TRITS
    bits = fmt.bits
    if bits != int(bits) or not 1 <= bits <= MAX_BITS or fmt.num_codes > 1 << int(bits):
        raise ValueError(f"{fmt.name}: {fmt.num_codes} codes cannot be packed in {bits:g} bits per value")
    return f"bits{int(bits)}"


def pack_codes(codes: torch.Tensor, fmt: ScalarFormat) -> torch.Tensor:
    """Codes of ``fmt`` (int32, any shape) packed by :func:`packing_scheme`: uint8 1-D."""
    scheme = packing_scheme(fmt)
    return pack_trits(codes) if scheme == TRITS else pack_bits(codes, _scheme_bits(scheme))


def unpack_codes(data: torch.Tensor, fmt: ScalarFormat, numel: int) -> torch.Tensor:
    """int32 ``[numel]`` codes of ``fmt`` from :func:`pack_codes`'s stream; ``ValueError`` when the stream
    is malformed or holds a code ``>= fmt.num_codes``."""
    scheme = packing_scheme(fmt)
    codes = unpack_trits(data, numel) if scheme == TRITS else unpack_bits(data, _scheme_bits(scheme), numel)
    if fmt.num_codes < 1 << MAX_BITS and codes.numel() and int(codes.max()) >= fmt.num_codes:
        raise ValueError(f"{fmt.name} has {fmt.num_codes} codes; the stream holds code {int(codes.max())}")
    return codes
