"""Learned step size quantization (LSQ, Esser et al. 2020) on any mixq grid, with straight-through rounding.

For a group ``X_g`` with step ``s_g`` the forward is exactly mixq's fake quantization
(:func:`mixq.quant.core.qdq_groups` with these scales): ``v = X_g / s_g``, ``q = round_F(clamp(v, lo, hi))``
on the element format ``F`` (its smallest and largest value), ``y = q * s_g``. The backward uses the
straight-through estimator for the rounding, which gives the LSQ gradients

    dy/dx = 1 inside [lo, hi] * s, 0 outside (clipped)
    dy/ds = round(v) - v inside, lo or hi outside

and the step's gradient is multiplied by ``g = 1 / sqrt(n * Q_P)`` (``n``: elements sharing the step,
``Q_P``: the format's largest value). The same formulas hold on non-uniform grids (FP4, NF4, ternary)
since only ``round`` changes. Asymmetric integers learn an integer zero point (rounded with STE) and
``asymf`` a float minimum; stored scales are rounded to the spec's scale format with STE, and a
second-level tensor scale (NVFP4) stays fixed at its initial value.

Every STE here adds an exact zero (``a.detach() + (b - b.detach())``), so forward values are bit-identical
to :func:`mixq.quant.fake_quantize` with the same scales, and exportable with
:func:`mixq.quant.core.quantize_with_scales`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mixq.formats import IntFormat, Rounding, ScalarFormat
from mixq.quant.core import choose_scales
from mixq.quant.granularity import Grouping, PerTensor
from mixq.quant.scale import GroupScales
from mixq.quant.spec import FP32, QuantSpec

MAX_ENUMERABLE = 1 << 16


def straight_through(value: Tensor, grad_of: Tensor) -> Tensor:
    """``value`` in the forward (bit-exact), the gradient of ``grad_of`` (identity) in the backward."""
    return value.detach() + (grad_of - grad_of.detach())


def scale_grad(t: Tensor, g: float) -> Tensor:
    """``t`` in the forward (bit-exact); its gradient multiplied by ``g`` in the backward."""
    return t.detach() + (t * g - (t * g).detach())


def format_range(fmt: ScalarFormat) -> tuple[float, float]:
    """The smallest and largest finite value of an element format (a signed format without a listed
    value set falls back to ``(-max, max)``)."""
    if fmt.num_codes <= MAX_ENUMERABLE:
        v = fmt.values()
        return float(v[0]), float(v[-1])
    return (-fmt.max if fmt.signed else 0.0), fmt.max


def lsq_grad_factor(n: int, spec: QuantSpec) -> float:
    """LSQ's step-gradient scale ``1 / sqrt(n * Q_P)``: ``n`` elements share the step, ``Q_P`` is the
    largest element value (an integer format's ``qmax``)."""
    fmt = spec.format
    q_p = float(fmt.qmax) if isinstance(fmt, IntFormat) else fmt.max
    return 1.0 / math.sqrt(max(n, 1) * max(q_p, 1e-12))


def _round_scale_format(t: Tensor, fmt: ScalarFormat) -> Tensor:
    """Round positive scales ``t`` onto ``fmt`` (STE), never to zero."""
    smallest = torch.finfo(torch.float32).tiny if fmt == FP32 else fmt.min_subnormal
    t = t.clamp(min=smallest)
    return t if fmt == FP32 else straight_through(fmt.round(t.detach()), t)


class LSQQuantizer(nn.Module):
    """Fake-quantizer with a learnable step per group (and zero point / offset where the spec has one).

    ``spec``: the quantizer (any scalar element format and granularity; rounding must be ``rne``).
    ``init``: a tensor to initialize from by the spec's scale rule (its shape is then fixed), or None
    for a per-tensor quantizer initialized from the first input it sees (static activations).
    ``learn``: whether the step (and zero point / offset) are trainable parameters.

    Parameters: ``step`` ([G] fp32, the stored block scale before rounding to the scale format),
    ``zero`` ([G], asymmetric integers) and ``offset`` ([G], ``asymf``); buffer ``tensor`` (0-d fp32,
    the fixed second-level scale) when the spec has one.
    """

    def __init__(self, spec: QuantSpec | str, init: Tensor | None = None, *, learn: bool = True) -> None:
        super().__init__()
        spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
        if spec.rounding is not Rounding.NEAREST:
            raise ValueError(f"LSQ trains with round-to-nearest elements; spec {spec} asks for "
                             f"{spec.rounding.value} rounding (drop the :sr / :rtz token)")
        if init is None and not isinstance(spec.granularity, PerTensor):
            raise ValueError(f"a quantizer initialized from its first input must be per tensor, got {spec}")
        self.spec = spec
        self.lo, self.hi = format_range(spec.format)
        groups = 1 if init is None else Grouping(tuple(init.shape), spec.granularity).num_groups
        self.step = nn.Parameter(torch.ones(groups), requires_grad=learn)
        self.zero = nn.Parameter(torch.zeros(groups), requires_grad=learn) \
            if spec.scale.asymmetric and not spec.scale.offset else None
        self.offset = nn.Parameter(torch.zeros(groups), requires_grad=learn) if spec.scale.offset else None
        self.register_buffer("tensor", torch.ones(()) if spec.scale.tensor_scale is not None else None)
        self.register_buffer("initialized", torch.tensor(False))
        if init is not None:
            self.initialize(init)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set step (and zero point, offset, tensor scale) from ``x`` by the spec's scale rule and clip."""
        grouping = Grouping(tuple(x.shape), self.spec.granularity)
        if grouping.num_groups != self.step.numel():
            raise ValueError(f"{grouping.num_groups} groups in {tuple(x.shape)} under {self.spec}, "
                             f"but the quantizer holds {self.step.numel()}")
        sc = choose_scales(grouping.to_groups(x.detach().float()), self.spec, 0, "torch")
        self.step.copy_(sc.block)
        if self.zero is not None:
            self.zero.copy_(sc.zero)
        if self.offset is not None:
            self.offset.copy_(sc.offset)
        if self.tensor is not None:
            self.tensor.copy_(sc.tensor)
        self.initialized.fill_(True)

    def _scales(self, grad_factor: float) -> GroupScales:
        """Effective scales as used by the forward (differentiable; values on the scale format)."""
        rule = self.spec.scale
        block = _round_scale_format(scale_grad(self.step, grad_factor), rule.format)  # [G]
        scale = block * self.tensor if self.tensor is not None else block
        zero = offset = None
        if self.zero is not None:
            fmt = self.spec.format
            z = scale_grad(self.zero, grad_factor)
            zero = straight_through(torch.round(z.detach()).clamp(fmt.qmin, fmt.qmax), z)
        if self.offset is not None:
            m = scale_grad(self.offset, grad_factor)
            offset = straight_through(rule.format.round(m.detach()), m)
        return GroupScales(scale, block, zero, self.tensor, offset)

    def scales(self) -> GroupScales:
        """The scales of the current forward (detached), in :class:`GroupScales` form for export."""
        with torch.no_grad():
            sc = self._scales(1.0)
        detach = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        return GroupScales(detach(sc.scale), detach(sc.block), detach(sc.zero), detach(sc.tensor),
                           detach(sc.offset))

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (shape fixed at initialization, any shape per tensor); same shape, dtype."""
        if not bool(self.initialized):  # a quantizer built without init: its first input sets the step
            self.initialize(x)
        grouping = Grouping(tuple(x.shape), self.spec.granularity)
        if grouping.num_groups != self.step.numel():
            raise ValueError(f"input {tuple(x.shape)} has {grouping.num_groups} groups under {self.spec}, "
                             f"the quantizer was initialized for {self.step.numel()}")
        X = grouping.to_groups(x.float())  # [G, n]
        g = lsq_grad_factor(grouping.group_size, self.spec)
        Y = lsq_groups(X, self._scales(g), self.spec, self.lo, self.hi)
        return grouping.from_groups(Y).to(x.dtype)


def lsq_groups(X: Tensor, sc: GroupScales, spec: QuantSpec, lo: float, hi: float) -> Tensor:
    """Differentiable fake quantization of groups ``X`` ([G, n] fp32) with scales ``sc`` ([G] each).

    Forward values equal :func:`mixq.quant.core.qdq_groups` (round to nearest) wherever ``X / s`` lies
    in ``[lo, hi]``, and saturate outside; the rounding is straight-through.
    """
    s = sc.scale[:, None]  # [G, 1]
    if sc.offset is not None:  # x = (r - qmin) * s + m
        qmin = float(spec.format.qmin)  # type: ignore[attr-defined]
        v = (X - sc.offset[:, None]) / s
        r = (_round_int(v) + qmin).clamp(lo, hi)
        return (r - qmin) * s + sc.offset[:, None]
    if sc.zero is not None:  # x = (r - z) * s
        z = sc.zero[:, None]
        r = (_round_int(X / s) + z).clamp(lo, hi)
        return (r - z) * s
    v = (X / s).clamp(lo, hi)
    q = straight_through(spec.format.round(v.detach()), v)
    return q * s


def _round_int(v: Tensor) -> Tensor:
    """Round half to even with a straight-through gradient."""
    return straight_through(torch.round(v.detach()), v)


def ste_fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """:func:`mixq.quant.fake_quantize` of ``x`` (same values, scales by the spec's rule from ``x``) with a
    straight-through gradient: identity where ``x`` is inside the clipping range, 0 where it was clipped."""
    grouping = Grouping(tuple(x.shape), spec.granularity)
    X = grouping.to_groups(x.float())  # [G, n]
    sc = choose_scales(X.detach(), spec, 0, "auto")
    lo, hi = format_range(spec.format)
    return grouping.from_groups(lsq_groups(X, sc, spec, lo, hi)).to(x.dtype)


class STEQuantizer(nn.Module):
    """Fake-quantizer whose scales follow the spec's rule on every call (no learned state), with STE.

    Used for dynamic activations (``int8:token``) and for weights when scales are not learned.
    """

    def __init__(self, spec: QuantSpec | str) -> None:
        super().__init__()
        spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
        if spec.rounding is not Rounding.NEAREST:
            raise ValueError(f"QAT trains with round-to-nearest elements; spec {spec} asks for "
                             f"{spec.rounding.value} rounding (drop the :sr / :rtz token)")
        self.spec = spec

    def scales_of(self, x: Tensor) -> GroupScales:
        """The scales the forward uses for ``x`` (groups of the spec's granularity)."""
        X = Grouping(tuple(x.shape), self.spec.granularity).to_groups(x.detach().float())
        return choose_scales(X, self.spec, 0, "auto")

    def forward(self, x: Tensor) -> Tensor:
        return ste_fake_quantize(x, self.spec)
