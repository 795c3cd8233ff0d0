"""Compiled CPU kernels (numba) for quantize-dequantize: the fast path, bit-identical to the reference.

The reference in :mod:`mixq.quant.core` is the truth; these kernels compute the same function
with one pass per group row:

- ``y = fp32(x / s)``; normal-range minifloat rounding on the fp32 bit pattern of ``|y|`` (add half
  an ulp plus the parity bit, or the top bits of the element's hash for stochastic rounding, then
  mask), values below the smallest normal by exact float arithmetic, then ``fp32(q * s)``;
- integers by ``rint``/``floor``/``trunc`` in float64, clamped; grids by counting midpoints.

Stochastic rounding draws the same hash-based uniforms as :mod:`mixq.quant.noise`. Kernels are
compiled on first use (about a second each, cached on disk by numba) and only used for tensors of
at least ``MIN_NUMEL`` elements, so a small call never pays a compilation.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch

from mixq.formats import FloatFormat, GridFormat, IntFormat, Rounding

MIN_NUMEL = 1 << 16
_MODES = {Rounding.NEAREST: 0, Rounding.STOCHASTIC: 1, Rounding.TOWARD_ZERO: 2}


def available() -> bool:
    """Whether numba is installed (the ``fast`` extra)."""
    return importlib.util.find_spec("numba") is not None


def _k():
    """The compiled kernels module (imports numba on first use only)."""
    from mixq.quant import _numba_kernels

    return _numba_kernels


def _usable(X: torch.Tensor, required: bool) -> bool:
    if X.device.type != "cpu" or X.dtype != torch.float32:
        if required:
            raise RuntimeError("the numba kernels run on fp32 CPU tensors only")
        return False
    if not available():
        if required:
            raise RuntimeError("backend='numba' needs numba: pip install 'mixq[fast]'")
        return False
    return required or X.numel() >= MIN_NUMEL


def _rows(X: torch.Tensor, *per_group: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Split few long groups into more rows (for threads); per-group vectors are repeated to match."""
    G, n = X.shape
    if G >= 64:
        return (X, *per_group)
    for c in (4096, 2048, 1024, 512, 256):
        if n % c == 0 and n > c:
            k = n // c
            return (X.reshape(G * k, c), *(v.repeat_interleave(k) for v in per_group))
    return (X, *per_group)


def _padded_mids(L: np.ndarray) -> np.ndarray:
    """Midpoints of sorted levels (float64), padded with +inf to ``2**k - 1`` entries for binary search."""
    mids = (L[:-1] + L[1:]) / 2
    size = (1 << int(math.ceil(math.log2(mids.size + 1)))) - 1
    return np.concatenate([mids, np.full(size - mids.size, np.inf)])


def row_minmax(X: torch.Tensor, required: bool = False):
    """``(lo, hi, has_nan)`` per row of ``X`` ([G, n] fp32), or None where the kernels do not apply."""
    if X.shape[1] == 0 or not _usable(X, required):
        return None
    G, n = X.shape
    Xc = X.contiguous()
    Xr = _rows(Xc)[0]
    lo = np.empty(Xr.shape[0], np.float32)
    hi = np.empty_like(lo)
    bad = np.empty(Xr.shape[0], np.bool_)
    _k().row_minmax(Xr.numpy(), lo, hi, bad)
    k = Xr.shape[0] // G
    lo_t, hi_t, bad_t = torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(bad)
    if k > 1:
        lo_t, hi_t, bad_t = lo_t.view(G, k).amin(1), hi_t.view(G, k).amax(1), bad_t.view(G, k).any(1)
    return lo_t, hi_t, bad_t


def absmax_scales(X: torch.Tensor, spec, required: bool = False) -> torch.Tensor | None:
    """Scales ([G] fp32) for the common rules, fused with the absmax pass; None when not covered.

    Covered: symmetric absmax clipping without a tensor scale, stored as fp32 (nearest) or as a
    power of two by the OCP floor rule. Everything else goes through :mod:`mixq.quant.scale`.
    """
    rule = spec.scale
    if (rule.asymmetric or rule.tensor_scale is not None or type(rule.clip).__name__ != "AbsMaxClip"
            or X.shape[1] == 0 or not _usable(X, required)):
        return None
    if rule.rule == "floor":
        code, emin, emax = 1, rule.format.emin, rule.format.emax
    elif rule.rule == "nearest" and rule.format == FloatFormat(8, 23, specials="ieee"):
        code, emin, emax = 0, 0, 0
    else:
        return None
    G = X.shape[0]
    Xr = X.contiguous()
    if G < 64:
        return None  # few long groups: the torch reduction is parallel enough
    scale = np.empty(G, np.float32)
    emax_elem = int(math.floor(math.log2(spec.format.max)))
    _k().row_absmax_scale(Xr.numpy(), scale, code, np.float32(spec.format.max), emax_elem, emin, emax)
    return torch.from_numpy(scale)


def qdq(X: torch.Tensor, sc, spec, seed: int, required: bool = False) -> torch.Tensor | None:
    """Quantize-dequantize groups ``X`` ([G, n] fp32) with scales ``sc``; None if not applicable."""
    fmt = spec.format
    if not isinstance(fmt, (IntFormat, FloatFormat, GridFormat)) or not _usable(X, required):
        return None
    if isinstance(fmt, FloatFormat) and fmt.emin < -126:  # normals below fp32's: reference only
        if required:
            raise RuntimeError(f"the numba kernels do not cover {fmt.name} (exponents below fp32's)")
        return None
    G, n = X.shape
    zero = sc.zero if sc.zero is not None else torch.zeros_like(sc.scale)
    Xr, s, z = _rows(X.contiguous(), sc.scale.contiguous(), zero.contiguous())
    out = torch.empty_like(Xr)
    x_np, s_np, o_np = Xr.numpy(), s.numpy(), out.numpy()
    mode = _MODES[spec.rounding]
    k = _k()
    if isinstance(fmt, IntFormat):
        kern = (k.qdq_int_rne, k.qdq_int_sr, k.qdq_int_rtz)[mode]
        kern(x_np, s_np, z.numpy(), o_np, float(fmt.qmin), float(fmt.qmax), seed)
    elif isinstance(fmt, FloatFormat):
        m = fmt.mantissa_bits
        flip = (fmt.bias + 1) & 1 if m == 0 else 0
        sub_step = fmt.min_subnormal if fmt.subnormals else fmt.min_normal
        max_bits = int(np.float32(fmt.max).view(np.uint32))
        over = fmt.max if fmt.saturate else (math.inf if fmt.has_inf else math.nan)
        over_bits = int(np.float32(over).view(np.uint32))
        kern = (k.qdq_float_rne, k.qdq_float_sr, k.qdq_float_rtz)[mode]
        kern(x_np, s_np, o_np, m, np.uint32(flip), sub_step, fmt.min_normal,
             np.uint32(max_bits), np.uint32(over_bits), np.uint32(0x80000000 if fmt.is_signed else 0), seed)
    else:
        L = fmt.level_tensor().numpy()
        k.qdq_grid(x_np, s_np, o_np, L, _padded_mids(L), mode, seed)
    return out.view(G, n)
