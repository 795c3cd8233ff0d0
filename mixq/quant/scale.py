"""Scale rules: from each group's range to a stored scale (and zero point).

Notation: a group ``X_g`` (fp32) is quantized as ``q = round(X_g / s_g)`` and decoded as ``q * s_g``
(asymmetric: ``(q - z_g) * s_g``). ``s_g = b_g * S`` where ``b_g`` is the stored block scale (a value
of the scale format) and ``S`` the optional fp32 tensor scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixq.formats import ExponentFormat, IntFormat, ScalarFormat
from mixq.formats.minifloat import floor_log2, pow2
from mixq.quant import kernels
from mixq.quant.spec import PercentileClip, QuantSpec


@dataclass(frozen=True)
class GroupScales:
    """Per-group scales: ``scale`` = ``block * tensor`` ([G] fp32), ``zero`` ([G] fp32 integers) or
    None, ``offset`` ([G] fp32 float minima of ``asymf``) or None."""

    scale: torch.Tensor
    block: torch.Tensor
    zero: torch.Tensor | None
    tensor: torch.Tensor | None
    offset: torch.Tensor | None = None


def group_range(X: torch.Tensor, spec: QuantSpec, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The range ``(lo, hi)`` ([G] fp32 each) to be covered, before any clipping search.

    Symmetric: ``(-amax, amax)``. Asymmetric: ``(min(x, 0), max(x, 0))``; with a float offset
    (``asymf``): ``(min(x), max(x))``. Percentile clipping
    takes the percentile of magnitudes (of values, asymmetric). NaN or inf anywhere in a group gives
    NaN. Groups of no elements get the range (0, 0).
    """
    if X.shape[1] == 0:
        zero = X.new_zeros(X.shape[0])
        return zero, zero.clone()
    clip = spec.scale.clip
    if isinstance(clip, PercentileClip):
        n = X.shape[1]
        k = max(1, min(n, math.ceil(clip.percent / 100.0 * n)))
        if spec.scale.asymmetric:
            lo, hi = X.kthvalue(n - k + 1, dim=1).values, X.kthvalue(k, dim=1).values
        else:
            hi = X.abs().kthvalue(k, dim=1).values
            lo = -hi
        bad = ~torch.isfinite(X).all(dim=1)  # a percentile can leave out an inf: the group is still NaN
    else:  # (an inf needs no flag here: it makes the scale non-finite, hence NaN)
        fast = kernels.row_minmax(X, required=backend == "numba") if backend != "torch" else None
        lo, hi, bad = fast if fast is not None else (*X.aminmax(dim=1), torch.isnan(X).any(dim=1))
        if not spec.scale.asymmetric:
            hi = torch.maximum(-lo, hi)
            lo = -hi
    if not spec.scale.offset:  # an integer zero point keeps 0 exact: the range must hold it
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    return torch.where(bad, torch.nan, lo), torch.where(bad, torch.nan, hi)


def kernel_scales(X: torch.Tensor, spec: QuantSpec, backend: str) -> GroupScales | None:
    """Scales of groups ``X`` ([G, n] fp32) from the compiled kernels, equal to the reference's, or
    None where the kernels do not cover the spec's rule (``backend``: auto|torch|numba)."""
    if backend == "torch":
        return None
    required = backend == "numba"
    if kernels.covers_absmax_scales(X, spec, required):
        if spec.scale.tensor_scale is None:  # one pass: maxima and scales together
            block = kernels.row_scales(X, spec)
            return GroupScales(block, block, None, None)
        amax = kernels.row_absmax(X)
        S = tensor_scale(amax, spec)
        block, scale = kernels.absmax_scales(amax, spec, S)
        return GroupScales(scale, block, None, S)
    if kernels.covers_asym_scales(X, spec, required):
        scale, zero = kernels.asym_scales(X, spec)
        return GroupScales(scale, scale, zero, None)
    return None


def tensor_scale(group_amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """Second-level scale ``S = amax / (element.max * scale_format.max)`` (0-d fp32), or None.

    ``group_amax`` ([G] fp32) holds each group's largest magnitude, NaN for non-finite groups;
    ``amax`` is taken over the finite groups only, so one bad group stays a NaN group and does not
    spoil the scale of the others.
    """
    ts = spec.scale.tensor_scale
    if ts is None:
        return None
    finite = torch.nan_to_num(group_amax, nan=0.0, posinf=0.0)  # non-finite groups count as empty
    amax = finite.max() if finite.numel() else group_amax.new_zeros(())
    S = (amax.float() / (spec.format.max * spec.scale.format.max))
    S = torch.where(S == 0, torch.ones_like(S), S)
    return ts.round(S.reshape(1)).reshape(())


def cast_scale(ideal: torch.Tensor, amax: torch.Tensor, fmt: ScalarFormat, rule: str,
               element_max: float) -> torch.Tensor:
    """Bring ideal scales ``amax / element_max`` ([G] fp32, > 0) into ``fmt`` by ``rule`` (fp32 values).

    The floor rule reads ``amax`` itself (not the rounded quotient), as the OCP MX specification does.
    """
    if rule == "floor":
        assert isinstance(fmt, ExponentFormat)
        k = floor_log2(amax.double()) - int(math.floor(math.log2(element_max)))
        return pow2(k.clamp(fmt.emin, fmt.emax)).float()
    if rule == "ceil":
        if fmt.num_codes > (1 << 16):
            return ideal.clone()  # fp32 scales: the ideal scale itself
        v = fmt.values().to(ideal.device)
        v = v[v > 0]
        return v[torch.searchsorted(v, ideal.contiguous()).clamp(max=v.numel() - 1)]
    return fmt.round(ideal)


def scales_for_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec,
                     S: torch.Tensor | None) -> GroupScales:
    """Scales (and zero points) that map ``[lo, hi]`` ([G] fp32) onto the element grid."""
    fmt, rule = spec.format, spec.scale
    if rule.asymmetric:
        assert isinstance(fmt, IntFormat)
        amax = torch.maximum(-lo, hi)
        ideal = (hi - lo) / float(fmt.qmax - fmt.qmin)
    else:
        amax = hi
        ideal = hi / fmt.max
    if S is not None:
        ideal, amax = ideal / S, amax / S
    finite = torch.isfinite(ideal)
    degenerate = finite & (ideal == 0)
    usable = finite & ~degenerate
    block = cast_scale(torch.where(usable, ideal, torch.ones_like(ideal)),
                       torch.where(usable, amax, torch.ones_like(amax)), rule.format, rule.rule, fmt.max)
    block = torch.where(block > 0, block, torch.full_like(block, rule.format.min_subnormal))
    one = rule.format.round(torch.ones(1)).item()
    block = torch.where(degenerate, torch.full_like(block, one), block)
    block = torch.where(finite, block, torch.full_like(block, torch.nan))
    scale = block * S if S is not None else block
    if rule.offset:
        return GroupScales(scale, block, None, S, rule.format.round(lo))
    zero = None
    if rule.asymmetric:
        zero = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax)
    return GroupScales(scale, block, zero, S)
