"""numba kernels behind :mod:`mixq.quant.kernels` (imported only when a kernel is first needed).

Every loop body is specialised for one rounding mode (0 nearest-even, 1 stochastic, 2 toward
zero) by an inlined helper called with a constant, so the inner loops are branch-free.
Minifloat parameters travel as one tuple ``fp = (m, flip, sub_step, min_normal, max_bits,
over_bits, sign_mask)`` (see ``kernels.float_params``).
"""

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from mixq.quant.noise import GOLDEN, MASK32, MIX1, MIX2

SIGN = np.uint32(0x80000000)
ABS = np.uint32(0x7FFFFFFF)
INF = np.uint32(0x7F800000)


@intrinsic
def f32_bits(typingctx, x):
    """The bit pattern (uint32) of an fp32 value."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """The fp32 value of the low 32 bits of an integer."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, context.get_value_type(types.uint32))
        return builder.bitcast(v, context.get_value_type(types.float32))

    return types.float32(x), codegen


@njit(inline="always")
def hash32(i, seed):
    h = (np.uint64(i) * np.uint64(GOLDEN) + np.uint64(seed)) & np.uint64(MASK32)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(MIX1)) & np.uint64(MASK32)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(MIX2)) & np.uint64(MASK32)
    return h ^ (h >> np.uint64(16))


@njit(inline="always")
def element_hash(mode, i, seed):
    """The 32-bit hash of element ``i`` for stochastic rounding (mode 1); 0 for the other modes."""
    return hash32(i, seed) if mode == 1 else np.uint64(0)


@njit(inline="always")
def round_mode(t, mode, h):
    """Round fp32 ``t`` to an integer (fp32): mode 0 half-even, 1 stochastic, 2 truncate.

    Stochastic: ``floor(t) + (1 - frac <= u)`` compared in float64 with the 24-bit uniform
    ``u = (h >> 8) / 2**24`` of the element's hash ``h``, exactly as the reference ``round_integers``.
    """
    if mode == 0:
        return np.rint(t)
    if mode == 2:
        return np.trunc(t)
    f = np.floor(t)
    u = np.float64(h >> np.uint64(8)) * 2.0**-24
    return f + (np.float32(1.0) if (1.0 - np.float64(t - f)) <= u else np.float32(0.0))


@njit(inline="always")
def round_minifloat(y, fp, mode, h):
    """fp32 ``y`` rounded onto a minifloat: on the bit pattern of ``|y|``, except below ``small``
    (the smallest normal where it is an fp32 normal), where ``rint(|y| / sub) * sub`` is exact in fp32.
    """
    shift, mask, half, parity, flip, sr_shift, inv_sub, sub, small, max_bits, over_bits, sign_mask = fp
    b = f32_bits(y)
    a = b & ABS
    if mode == 0:
        add = half + (((a >> shift) ^ flip) & parity)
    elif mode == 1:
        add = np.uint32(h >> sr_shift)
    else:
        add = np.uint32(0)
    rb = (a + add) & mask
    rb = over_bits if rb > max_bits else rb
    rb = a if a > INF else rb  # NaN stays NaN
    negative = (b & SIGN) != 0
    qn = bits_f32((b & sign_mask) | rb)
    if sign_mask == 0:  # unsigned: negatives (not NaN) go to 0
        qn = np.float32(0.0) if negative and a <= INF else qn
    ay = abs(y)
    q = round_mode(ay * inv_sub, mode, h) * sub
    q = (-q if negative else q) if sign_mask != 0 else (np.float32(0.0) if negative else q)
    return q if ay < small else qn


@njit(parallel=True, cache=True)
def row_minmax(X, lo, hi, bad):
    R, n = X.shape
    for r in prange(R):
        mn = np.float32(np.inf)
        mx = np.float32(-np.inf)
        nan = False
        for j in range(n):
            v = X[r, j]
            nan |= v != v
            mn = v if v < mn else mn  # selects (not min/max with NaN rules): they vectorise
            mx = v if v > mx else mx
        lo[r] = mn
        hi[r] = mx
        bad[r] = nan


@njit(inline="always")
def amax_of_row(X, r):
    """Largest magnitude of row ``r`` (fp32); NaN when the row holds NaN or inf."""
    top = np.uint32(0)
    for j in range(X.shape[1]):
        top = max(top, f32_bits(X[r, j]) & ABS)  # as unsigned patterns: NaN > inf > finite
    return np.float32(np.nan) if top >= INF else bits_f32(top)


@njit(inline="always")
def block_scale(amax, rule, element_max, emax_elem, emin, emax, S, fp, one, min_sub):
    """The stored block scale of a group whose largest magnitude is ``amax``, as the reference.

    rule 0: fp32 ``amax / element_max``; 1: OCP floor ``2**clamp(floor(log2 amax) - emax_elem)``;
    2: nearest value of the minifloat ``fp``. ``S``: tensor scale (1 when there is none).
    """
    a = amax / S
    ideal = (amax / element_max) / S
    if ideal != ideal or abs(ideal) == np.inf:
        return np.float32(np.nan)
    if ideal == 0:
        return one
    if rule == 0:
        return ideal
    if rule == 1:
        e = np.int64(f32_bits(a) >> np.uint32(23)) - 127  # floor(log2 a) for normal a
        if e == -127:  # an fp32 subnormal
            e = math.frexp(np.float64(a))[1] - 1
        k = min(max(e - emax_elem, emin), emax)
        return bits_f32(np.uint32((k + 127) << 23) if k >= -126 else np.uint32(1 << (k + 149)))
    b = round_minifloat(ideal, fp, 0, np.uint64(0))
    return b if b > 0 else min_sub


@njit(parallel=True, cache=True)
def row_absmax(X, amax):
    """Largest magnitude per row (fp32); NaN for rows holding NaN or inf."""
    for r in prange(X.shape[0]):
        amax[r] = amax_of_row(X, r)


@njit(parallel=True, cache=True)
def scales_from_amax(amax, block, scale, rule, element_max, emax_elem, emin, emax, S, fp, one, min_sub):
    """Block scales (and ``block * S``) from row maxima; see ``block_scale``."""
    for g in prange(amax.shape[0]):
        b = block_scale(amax[g], rule, element_max, emax_elem, emin, emax, S, fp, one, min_sub)
        block[g] = b
        scale[g] = b * S


@njit(parallel=True, cache=True)
def row_scales(X, block, rule, element_max, emax_elem, emin, emax, fp, one, min_sub):
    """``block_scale`` of every row's largest magnitude in one pass (no tensor scale)."""
    for r in prange(X.shape[0]):
        block[r] = block_scale(amax_of_row(X, r), rule, element_max, emax_elem, emin, emax, np.float32(1.0),
                               fp, one, min_sub)


@njit(parallel=True, cache=True)
def row_asym_scales(X, scale, zero, qmin, qmax):  # qmin, qmax: fp32
    """Asymmetric fp32 scales and integer zero points per row, exactly as the reference:
    ``lo = min(x, 0)``, ``hi = max(x, 0)``, ``s = fp32(hi - lo) / (qmax - qmin)`` (1 when 0, NaN for
    rows holding NaN or inf), ``z = clamp(qmin - rint(lo / s), qmin, qmax)``."""
    span = np.float32(qmax - qmin)
    for r in prange(X.shape[0]):
        lo = np.float32(0.0)
        hi = np.float32(0.0)
        bad = False
        for j in range(X.shape[1]):
            v = X[r, j]
            bad |= (v - v) != 0  # NaN or inf
            lo = v if v < lo else lo  # selects (not min/max with NaN rules): they vectorise
            hi = v if v > hi else hi
        ideal = (hi - lo) / span
        sc = np.float32(1.0) if ideal == 0 else ideal
        z = qmin - np.rint(lo / sc)
        z = qmin if z < qmin else (qmax if z > qmax else z)
        bad |= (ideal - ideal) != 0  # hi - lo can overflow
        scale[r] = np.float32(np.nan) if bad else sc
        zero[r] = np.float32(np.nan) if bad else z


@njit(inline="always")
def _int_row(X, s, z, out, r, qmin, qmax, mode, seed):
    n = X.shape[1]
    sc = s[r]
    zr = np.float64(z[r])
    zf = np.float32(z[r])
    for j in range(n):
        y = X[r, j] / sc
        t = np.float64(round_mode(y, mode, element_hash(mode, r * n + j, seed))) + zr
        t = min(max(t, qmin), qmax)
        q = (np.float32(t) - zf) * sc
        out[r, j] = q if y == y else y


@njit(parallel=True, cache=True)
def qdq_int_rne(X, s, z, out, qmin, qmax, seed):
    for r in prange(X.shape[0]):
        _int_row(X, s, z, out, r, qmin, qmax, 0, seed)


@njit(parallel=True, cache=True)
def qdq_int_sr(X, s, z, out, qmin, qmax, seed):
    for r in prange(X.shape[0]):
        _int_row(X, s, z, out, r, qmin, qmax, 1, seed)


@njit(parallel=True, cache=True)
def qdq_int_rtz(X, s, z, out, qmin, qmax, seed):
    for r in prange(X.shape[0]):
        _int_row(X, s, z, out, r, qmin, qmax, 2, seed)


@njit(inline="always")
def _float_row(X, s, out, r, fp, mode, seed):
    n = X.shape[1]
    sc = s[r]
    for j in range(n):
        out[r, j] = round_minifloat(X[r, j] / sc, fp, mode, element_hash(mode, r * n + j, seed)) * sc


@njit(parallel=True, cache=True)
def qdq_float_rne(X, s, out, fp, seed):
    for r in prange(X.shape[0]):
        _float_row(X, s, out, r, fp, 0, seed)


@njit(parallel=True, cache=True)
def qdq_float_sr(X, s, out, fp, seed):
    for r in prange(X.shape[0]):
        _float_row(X, s, out, r, fp, 1, seed)


@njit(parallel=True, cache=True)
def qdq_float_rtz(X, s, out, fp, seed):
    for r in prange(X.shape[0]):
        _float_row(X, s, out, r, fp, 2, seed)


@njit(parallel=True, cache=True)
def qdq_grid_rne(X, s, out, L32, thr):
    """Nearest level: the index is the number of fp32 thresholds below ``y`` (``kernels.grid_thresholds``)."""
    R, n = X.shape
    nt = thr.shape[0]
    chunks = min(R, 256)
    for c in prange(chunks):
        k = np.empty(n, np.float32)
        y = np.empty(n, np.float32)
        for r in range(c * R // chunks, (c + 1) * R // chunks):
            sc = s[r]
            for j in range(n):
                y[j] = X[r, j] / sc
                k[j] = 0
            for i in range(nt):
                t = thr[i]
                for j in range(n):
                    k[j] += np.float32(1.0) if y[j] > t else np.float32(0.0)
            for j in range(n):
                v = L32[np.int32(k[j])] * sc
                out[r, j] = v if y[j] == y[j] else y[j]


@njit(parallel=True, cache=True)
def qdq_grid_directed(X, s, out, L, mode, seed):
    """Stochastic (mode 1) or toward-zero (mode 2) rounding between the two neighbouring levels."""
    R, n = X.shape
    nl = L.shape[0]
    for r in prange(R):
        sc = s[r]
        for j in range(n):
            y = X[r, j] / sc
            y64 = np.float64(y)
            k = -1
            for i in range(nl):
                k += L[i] <= y64
            k = min(max(k, 0), nl - 2)
            lo, hi = L[k], L[k + 1]
            if mode == 1:
                p = min(max((y64 - lo) / (hi - lo), 0.0), 1.0)
                u = np.float64(hash32(r * n + j, seed) >> np.uint64(8)) * 2.0**-24
                k += 1 if (1.0 - p) <= u else 0
            elif y64 >= hi:
                k += 1
            elif y64 > lo and abs(hi) < abs(lo):
                k += 1
            out[r, j] = np.float32(L[k]) * sc if y == y else y
