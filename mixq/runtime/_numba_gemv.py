"""numba kernels behind ``PackedLinearWeightOnly`` for few input rows (decode): fused unpack + dot.

Imported only when first needed (``mixq.runtime.linear._gemv``). Weights are formed from the packed
bytes with exactly the arithmetic of ``dequantize`` (values from the byte look-up table, then
``q * s``, ``(q - z) * s`` or ``(q - qmin) * s + m`` per group, fp32, no fast-math) and only then
multiplied with the inputs; only the order of the fp32 sums differs from a plain matmul, as with any
BLAS. ``gemv`` decodes each output row into a row buffer and takes a fast-math (vectorized) dot with
every input row; ``gemv1_nibbles`` (one input row, 4-bit codes) never stores a weight and keeps 4
running sums. Both need ``K % 8 == 0`` and groups of a multiple of 8 elements; the caller checks.
"""

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _decode_row(data_row, lut, per, scale, zero, offset, qmin, mode, group, g0, w):
    """Fill ``w [K]`` with one row's weights from ``data_row [B]`` uint8; groups ``g0, g0+1, ..``."""
    bpg = group // per  # bytes per group
    for gi in range(w.shape[0] // group):
        s = scale[g0 + gi]
        if mode == 0:
            for b in range(gi * bpg, (gi + 1) * bpg):
                i, k = np.int64(data_row[b]) * per, b * per
                for j in range(per):
                    w[k + j] = lut[i + j] * s
        elif mode == 1:
            z = zero[g0 + gi]
            for b in range(gi * bpg, (gi + 1) * bpg):
                i, k = np.int64(data_row[b]) * per, b * per
                for j in range(per):
                    w[k + j] = (lut[i + j] - z) * s
        else:
            m = offset[g0 + gi]
            for b in range(gi * bpg, (gi + 1) * bpg):
                i, k = np.int64(data_row[b]) * per, b * per
                for j in range(per):
                    w[k + j] = (lut[i + j] - qmin) * s + m


@njit(cache=True, fastmath=True)
def _dot(w, x):
    acc = np.float32(0.0)
    for k in range(w.shape[0]):
        acc += w[k] * x[k]
    return acc


@njit(cache=True, parallel=True)
def gemv(x, data, lut, per, scale, zero, offset, qmin, mode, group, tensor_wide, out):
    """``out [M, N] = x [M, K] @ W^T`` with ``W`` decoded row by row from ``data [N, K * bits / 8]``.

    ``lut [256 * per]`` fp32: the values of the ``per`` codes of each byte. ``mode``: 0 symmetric,
    1 integer zero points ``zero [G]``, 2 float offsets ``offset [G]``. ``group``: elements per group
    along K; ``tensor_wide``: one group for the whole matrix (then ``group == K``).
    """
    N = data.shape[0]
    K = x.shape[1]
    per_row = K // group
    chunk = 32
    for c in prange((N + chunk - 1) // chunk):
        w = np.empty(K, np.float32)
        for n in range(c * chunk, min(N, (c + 1) * chunk)):
            g0 = 0 if tensor_wide else n * per_row
            _decode_row(data[n], lut, per, scale, zero, offset, qmin, mode, group, g0, w)
            for m in range(x.shape[0]):
                out[m, n] = _dot(w, x[m])


@njit(cache=True, parallel=True)
def gemv1_nibbles(x, data, lut, scale, zero, offset, qmin, mode, group, tensor_wide, out):
    """``gemv`` for one input row ``x [1, K]`` and 4-bit codes (2 per byte): weights decoded on the fly.

    Each weight is rounded to fp32 exactly as ``dequantize`` forms it (``q * s``, ``(q - z) * s`` or
    ``(q - qmin) * s + m``) before it is multiplied with its input; only the summation order differs
    from a plain dot product (4 interleaved partial sums). ``lut [512]``: the two values of each byte.
    """
    N = data.shape[0]
    K = x.shape[1]
    per_row = K // group
    x0 = x[0]
    for n in prange(N):
        row = data[n]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for gi in range(per_row):
            g = 0 if tensor_wide else n * per_row + gi
            s = scale[g]
            lo, hi = gi * group // 2, (gi + 1) * group // 2
            if mode == 0:
                for b in range(lo, hi, 2):
                    i, j, k = np.int64(row[b]) * 2, np.int64(row[b + 1]) * 2, b * 2
                    a0 += (lut[i] * s) * x0[k]
                    a1 += (lut[i + 1] * s) * x0[k + 1]
                    a2 += (lut[j] * s) * x0[k + 2]
                    a3 += (lut[j + 1] * s) * x0[k + 3]
            elif mode == 1:
                z = zero[g]
                for b in range(lo, hi, 2):
                    i, j, k = np.int64(row[b]) * 2, np.int64(row[b + 1]) * 2, b * 2
                    a0 += ((lut[i] - z) * s) * x0[k]
                    a1 += ((lut[i + 1] - z) * s) * x0[k + 1]
                    a2 += ((lut[j] - z) * s) * x0[k + 2]
                    a3 += ((lut[j + 1] - z) * s) * x0[k + 3]
            else:
                m = offset[g]
                for b in range(lo, hi, 2):
                    i, j, k = np.int64(row[b]) * 2, np.int64(row[b + 1]) * 2, b * 2
                    a0 += ((lut[i] - qmin) * s + m) * x0[k]
                    a1 += ((lut[i + 1] - qmin) * s + m) * x0[k + 1]
                    a2 += ((lut[j] - qmin) * s + m) * x0[k + 2]
                    a3 += ((lut[j + 1] - qmin) * s + m) * x0[k + 3]
        out[0, n] = (a0 + a1) + (a2 + a3)
