"""Compiled CPU kernels (numba) for quantize-dequantize: the fast path, bit-identical to the reference.

The reference in :mod:`mixq.quant.core` is the truth; these kernels compute the same function
with one pass per group row:

- ``y = fp32(x / s)``; normal-range minifloat rounding on the fp32 bit pattern of ``|y|`` (add half
  an ulp plus the parity bit, or the top bits of the element's hash for stochastic rounding, then
  mask), values below the smallest normal by exact float64 arithmetic, then ``fp32(q * s)``;
- integers by ``rint``/``floor``/``trunc`` in float64, clamped; grids by counting midpoints;
- symmetric absmax scales (fp32, OCP floor to E8M0, or nearest into a minifloat such as E4M3,
  with or without a tensor scale) and asymmetric fp32 scales with integer zero points, from one
  pass over the rows. MSE and percentile clipping and float offsets use the reference scales.

Stochastic rounding draws the same hash-based uniforms as :mod:`mixq.quant.noise`. Kernels are
compiled on first use (about a second each; numba caches them on disk) and only used for tensors
of at least ``MIN_NUMEL`` elements, so a small call never pays a compilation.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import numpy as np
import torch

from mixq.formats import ExponentFormat, FloatFormat, GridFormat, IntFormat, Rounding
from mixq.quant.spec import AbsMaxClip

MIN_NUMEL = 1 << 16
_MODES = {Rounding.NEAREST: 0, Rounding.STOCHASTIC: 1, Rounding.TOWARD_ZERO: 2}
_FP32 = FloatFormat(8, 23, specials="ieee")


def available() -> bool:
    """Whether numba is installed (the ``fast`` extra)."""
    return importlib.util.find_spec("numba") is not None


@functools.lru_cache(maxsize=1)
def _module():
    """The compiled kernels module (imports numba on first use only).

    numba's first parallel launch resets the size of torch's OpenMP thread pool (they share the
    runtime); one tiny launch here, with torch's thread count restored after it, keeps a caller's
    ``torch.set_num_threads`` in force.
    """
    from mixq.quant import _numba_kernels

    threads = torch.get_num_threads()
    _numba_kernels.row_absmax(np.zeros((1, 1), np.float32), np.zeros(1, np.float32))
    torch.set_num_threads(threads)
    return _numba_kernels


def _k():
    """The kernels, with numba's thread count capped at torch's (more threads than torch uses spin
    idle between calls and cost ~8x the CPU of a call on a loaded 2-core machine)."""
    module = _module()
    import numba

    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    return module


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


def _kernel_float(fmt: FloatFormat) -> bool:
    """Whether the bit-pattern kernel is exact for ``fmt``.

    With ``emin == -126`` the format's subnormals are fp32's, whose bit patterns are linear, so the
    normal-range bit rounding is exact for them too (without subnormals it is not). With a larger
    ``emin`` the range below the smallest normal is done in fp32, exact while ``1/sub_step`` is
    an fp32. Anything else runs on the reference.
    """
    sub = fmt.min_subnormal if fmt.subnormals else fmt.min_normal
    if fmt.emin == -126:
        return fmt.subnormals
    return fmt.emin > -126 and 1.0 / sub <= 2.0**127


def float_params(fmt: FloatFormat) -> tuple:
    """The loop-invariant constants of ``round_minifloat`` for ``fmt`` (see the kernel)."""
    m = fmt.mantissa_bits
    over = fmt.max if fmt.saturate else (math.inf if fmt.has_inf else math.nan)
    sub = fmt.min_subnormal if fmt.subnormals else fmt.min_normal
    small = 0.0 if fmt.emin == -126 else fmt.min_normal  # emin -126: all on the bit pattern
    if small == 0.0:
        sub = 1.0  # the fp32 path is never taken
    return (
        np.uint32(23 - m),  # shift: mantissa bits dropped
        np.uint32((0xFFFFFFFF << (23 - m)) & 0xFFFFFFFF),  # mask
        np.uint32((1 << (22 - m)) - 1 if m < 23 else 0),  # half: just under half an ulp
        np.uint32(1 if m < 23 else 0),  # parity: the kept last bit breaks ties (none for fp32)
        np.uint32((fmt.bias + 1) & 1 if m == 0 else 0),  # flip: m = 0 ties by exponent-field parity
        np.uint64(9 + m),  # sr_shift: the top 23 - m bits of the 32-bit hash
        np.float32(1.0 / sub),
        np.float32(sub),
        np.float32(small),
        np.uint32(np.float32(fmt.max).view(np.uint32)),
        np.uint32(np.float32(over).view(np.uint32)),
        np.uint32(0x80000000 if fmt.is_signed else 0),
    )


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


def grid_thresholds(L: np.ndarray) -> np.ndarray:
    """fp32 thresholds ``t_i`` with ``#{i: y > t_i}`` = the nearest level's index for every fp32 ``y``.

    ``L``: sorted levels (float64 holding fp32 values). The midpoint ``m_i`` of levels i and i+1 is
    exact in float64; for fp32 ``y``, ``y > m_i`` is ``y > t_i`` with ``t_i`` the largest fp32 below
    ``m_i`` (or ``m_i`` itself when it is an fp32, where a tie ``y == m_i`` goes to the even index).
    """
    mids = (L[:-1] + L[1:]) / 2
    m32 = mids.astype(np.float32)
    down = np.nextafter(m32, np.float32(-np.inf))
    exact = m32.astype(np.float64) == mids
    tie_up = (np.arange(1, mids.size + 1) % 2) == 0  # the upper neighbour i+1 has the even index
    below = np.where(m32.astype(np.float64) > mids, down, m32)
    return np.where(exact & tie_up, down, np.where(exact, m32, below)).astype(np.float32)


def row_minmax(X: torch.Tensor, required: bool = False):
    """``(lo, hi, has_nan)`` per row of ``X`` ([G, n] fp32), or None where the kernels do not apply."""
    if X.shape[1] == 0 or not _usable(X, required):
        return None
    G = X.shape[0]
    Xr = _rows(X.contiguous())[0]
    lo = np.empty(Xr.shape[0], np.float32)
    hi = np.empty_like(lo)
    bad = np.empty(Xr.shape[0], np.bool_)
    _k().row_minmax(Xr.numpy(), lo, hi, bad)
    k = Xr.shape[0] // G
    lo_t, hi_t, bad_t = torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(bad)
    if k > 1:
        lo_t, hi_t, bad_t = lo_t.view(G, k).amin(1), hi_t.view(G, k).amax(1), bad_t.view(G, k).any(1)
    return lo_t, hi_t, bad_t


def covers_absmax_scales(X: torch.Tensor, spec, required: bool = False) -> bool:
    """Whether :func:`row_absmax` + :func:`absmax_scales` implement ``spec``'s scale rule
    (``required``: the caller asked for the kernels, whatever the size of ``X``)."""
    rule = spec.scale
    if rule.asymmetric or not isinstance(rule.clip, AbsMaxClip) or X.shape[1] == 0 or X.shape[0] < 64:
        return False
    if not _usable(X, required):
        return False
    if rule.rule == "floor":
        return True
    if rule.rule != "nearest":
        return False
    return rule.format == _FP32 or (isinstance(rule.format, FloatFormat) and _kernel_float(rule.format))


def row_absmax(X: torch.Tensor) -> torch.Tensor:
    """Largest magnitude per row ([G] fp32), NaN for rows holding NaN or inf."""
    amax = np.empty(X.shape[0], np.float32)
    _k().row_absmax(X.contiguous().numpy(), amax)
    return torch.from_numpy(amax)


def _scale_params(spec) -> tuple:
    """``(rule, element_max, emax_elem, emin, emax)``, ``fp``, ``one``, ``min_sub`` of ``block_scale``."""
    rule, el = spec.scale, spec.format
    fmt = rule.format
    if rule.rule == "floor":
        assert isinstance(fmt, ExponentFormat)
        code, emin, emax, fp = 1, fmt.emin, fmt.emax, float_params(_FP32)
    elif fmt == _FP32:
        code, emin, emax, fp = 0, 0, 0, float_params(_FP32)
    elif not _kernel_float(fmt):
        raise ValueError(f"no kernel for scale format {fmt.name}")
    else:
        code, emin, emax, fp = 2, 0, 0, float_params(fmt)
    head = (code, np.float32(el.max), int(math.floor(math.log2(el.max))), emin, emax)
    return head, fp, np.float32(fmt.round(torch.ones(1)).item()), np.float32(fmt.min_subnormal)


def absmax_scales(amax: torch.Tensor, spec, S: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block, scale)`` ([G] fp32 each) from row maxima; the spec must pass :func:`covers_absmax_scales`."""
    head, fp, one, min_sub = _scale_params(spec)
    block = np.empty(amax.shape[0], np.float32)
    scale = np.empty_like(block)
    _k().scales_from_amax(amax.numpy(), block, scale, *head, np.float32(1.0 if S is None else float(S)), fp, one,
                          min_sub)
    return torch.from_numpy(block), torch.from_numpy(scale)


def covers_asym_scales(X: torch.Tensor, spec, required: bool = False) -> bool:
    """Whether :func:`asym_scales` implements ``spec``'s scale rule (integer zero point, min-max
    range, fp32 scales, no tensor scale)."""
    rule = spec.scale
    return (rule.asymmetric and not rule.offset and isinstance(rule.clip, AbsMaxClip)
            and rule.format == _FP32 and rule.tensor_scale is None and X.shape[1] > 0 and X.shape[0] >= 64
            and _usable(X, required))


def asym_scales(X: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` ([G] fp32 each) in one pass over ``X`` ([G, n] fp32); see :func:`covers_asym_scales`."""
    fmt = spec.format
    scale = np.empty(X.shape[0], np.float32)
    zero = np.empty_like(scale)
    _k().row_asym_scales(X.contiguous().numpy(), scale, zero, np.float32(fmt.qmin), np.float32(fmt.qmax))
    return torch.from_numpy(scale), torch.from_numpy(zero)


def row_scales(X: torch.Tensor, spec) -> torch.Tensor:
    """Block scales ([G] fp32) in one pass over ``X`` ([G, n] fp32), for a spec without tensor scale
    that passes :func:`covers_absmax_scales`; equal to ``absmax_scales(row_absmax(X), spec, None)``."""
    head, fp, one, min_sub = _scale_params(spec)
    block = np.empty(X.shape[0], np.float32)
    _k().row_scales(X.contiguous().numpy(), block, *head, fp, one, min_sub)
    return torch.from_numpy(block)


def qdq(X: torch.Tensor, sc, spec, seed: int, required: bool = False,
        out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Quantize-dequantize groups ``X`` ([G, n] fp32) with scales ``sc`` into ``out`` (a contiguous
    ``[G, n]`` fp32 tensor, allocated when None); None if the kernels do not apply."""
    fmt = spec.format
    if not isinstance(fmt, (IntFormat, FloatFormat, GridFormat)) or not _usable(X, required):
        return None
    if isinstance(fmt, FloatFormat) and not _kernel_float(fmt):
        if required:
            raise RuntimeError(f"the numba kernels do not cover {fmt.name} (its range reaches fp32's limits)")
        return None
    if sc.offset is not None:  # float offsets (asymf): reference only
        if required:
            raise RuntimeError("the numba kernels do not cover float offsets (asymf)")
        return None
    zero = sc.zero if sc.zero is not None else torch.zeros_like(sc.scale)
    Xr, s, z = _rows(X.contiguous(), sc.scale.contiguous(), zero.contiguous())
    result = torch.empty_like(X) if out is None else out
    o_np = result.view(Xr.shape).numpy()
    x_np, s_np = Xr.numpy(), s.numpy()
    mode = _MODES[spec.rounding]
    k = _k()
    if isinstance(fmt, IntFormat):
        kern = (k.qdq_int_rne, k.qdq_int_sr, k.qdq_int_rtz)[mode]
        if fmt.fraction_bits:  # k / 2**f at scale s is the integer k at scale s / 2**f (exact)
            s_np = (s * fmt.unit).numpy()
        kern(x_np, s_np, z.numpy(), o_np, float(fmt.qmin), float(fmt.qmax), seed)
    elif isinstance(fmt, FloatFormat):
        kern = (k.qdq_float_rne, k.qdq_float_sr, k.qdq_float_rtz)[mode]
        kern(x_np, s_np, o_np, float_params(fmt), seed)
    else:
        L = fmt.level_tensor().numpy()
        if mode == 0:
            k.qdq_grid_rne(x_np, s_np, o_np, L.astype(np.float32), grid_thresholds(L))
        else:
            k.qdq_grid_directed(x_np, s_np, o_np, L, mode, seed)
    return result
