"""Current and delayed scaling of the per-tensor operands of an emulated low-precision GEMM.

*Current* (just-in-time) scaling takes each tensor's scale from the tensor itself: that is what
:func:`mixq.quant.fake_quantize` does, for every granularity.

*Delayed* scaling (Transformer Engine's FP8 recipe) keeps, per tensor role, a history of the
amaxes (largest magnitudes) of the last ``N`` steps, and quantizes the current tensor with the
fixed scale of the history's maximum, ``s = 2**margin * max(history) / element.max``; the current
amax is recorded after use. Values beyond the reference amax saturate to the format's largest
value. A role with an empty history (the first step) falls back to current scaling.

*Predicted* scaling of weights (MOSS's automatic scaling) avoids the max-reduction over the weight on
most steps: an optimizer whose update moves every weight by at most ``u`` per step (Adam-type rules:
about the learning rate) cannot grow ``max|W|`` by more than ``u`` per step, so after ``k`` steps since
the last exact amax ``a``, ``a + k u`` bounds it. The weight is quantized with that predicted amax (a
scale that never saturates while the bound holds, slightly coarser than the exact one) and the exact
amax is recomputed every ``refresh`` calls. Calls are counted per role (one forward per training step;
evaluation forwards count too, which only loosens the bound).

Delayed and predicted scaling are defined here for per-tensor, symmetric, absmax specs without a
tensor scale (``fp8_e4m3``, ``fp8_e5m2:sr``, ``int8``, ...); block formats keep their current per-block
scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixq.formats import Rounding
from mixq.quant import AbsMaxClip, PerTensor, QuantSpec, fake_quantize
from mixq.quant.core import qdq_groups
from mixq.quant.noise import draw_seed
from mixq.quant.scale import scales_for_range


@dataclass(frozen=True)
class DelayedScaling:
    """Delayed scaling: ``history`` steps of amax per role, scale from their max times ``2**margin``."""

    history: int = 16
    margin: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.history, int) or self.history < 1:
            raise ValueError(f"the amax history needs a positive integer length, got {self.history!r}")
        if not isinstance(self.margin, int):
            raise ValueError(f"the margin is an integer power of two, got {self.margin!r}")


@dataclass(frozen=True)
class PredictedScaling:
    """MOSS-style predicted weight scaling: ``max_update`` bounds ``|ΔW|`` per step; the exact amax is
    recomputed every ``refresh`` calls."""

    max_update: float
    refresh: int = 64

    def __post_init__(self) -> None:
        if not (isinstance(self.max_update, int | float) and self.max_update >= 0):
            raise ValueError(f"max_update bounds |dW| per step: a number >= 0, got {self.max_update!r}")
        if not isinstance(self.refresh, int) or self.refresh < 1:
            raise ValueError(f"refresh is a positive number of calls, got {self.refresh!r}")


PREDICTED_ROLES = ("weight", "dgrad_weight")


def check_delayed_spec(spec: QuantSpec, role: str) -> None:
    """Raise ValueError unless ``spec`` can use a delayed (fixed, per-tensor) scale."""
    s = spec.scale
    if (not isinstance(spec.granularity, PerTensor) or s.asymmetric or s.tensor_scale is not None
            or not isinstance(s.clip, AbsMaxClip)):
        raise ValueError(f"delayed scaling needs a per-tensor symmetric absmax spec without a tensor scale; "
                         f"role {role!r} has {spec} (use current scaling for block formats)")


class ScalingState(nn.Module):
    """Amax histories of the roles that use delayed scaling, and the weight roles' predicted amax
    (buffers, saved in ``state_dict``).

    For each delayed role ``r``: ``amax_r`` ([history] fp32, a ring buffer of recorded amaxes) and
    ``steps_r`` (0-d int64, how many were recorded). For each predicted role ``r`` (``predicted_roles``):
    ``ref_r`` (0-d fp32, the last exact amax) and ``since_r`` (0-d int64, calls since it; 0: none yet).
    """

    def __init__(self, config: DelayedScaling | None, roles: Sequence[str],
                 predicted: PredictedScaling | None = None, predicted_roles: Sequence[str] = ()) -> None:
        super().__init__()
        self.config = config if config is not None else DelayedScaling()
        self.roles = tuple(roles) if config is not None else ()
        self.predicted = predicted
        self.predicted_roles = tuple(predicted_roles) if predicted is not None else ()
        overlap = set(self.roles) & set(self.predicted_roles)
        if overlap:
            raise ValueError(f"roles {sorted(overlap)} cannot use both delayed and predicted scaling")
        for role in self.roles:
            self.register_buffer(f"amax_{role}", torch.zeros(self.config.history))
            self.register_buffer(f"steps_{role}", torch.zeros((), dtype=torch.int64))
        for role in self.predicted_roles:
            self.register_buffer(f"ref_{role}", torch.zeros(()))
            self.register_buffer(f"since_{role}", torch.zeros((), dtype=torch.int64))

    def predicted_amax(self, role: str, t: Tensor) -> tuple[Tensor, bool]:
        """The amax to quantize ``t`` with for a predicted role, and whether it was measured exactly
        (first call and every ``refresh`` calls); advances the role's call count."""
        assert self.predicted is not None
        since = getattr(self, f"since_{role}")
        ref = getattr(self, f"ref_{role}")
        exact = int(since) == 0 or int(since) >= self.predicted.refresh
        if exact:
            ref.copy_(t.detach().abs().amax().float() if t.numel() else torch.zeros(()))
            since.fill_(1)
            return ref.clone(), True
        amax = ref + int(since) * self.predicted.max_update
        since += 1
        return amax, False

    def _check(self, role: str) -> None:
        if role not in self.roles:
            raise KeyError(f"role {role!r} has no amax history; roles: {', '.join(self.roles)}")

    def history(self, role: str) -> Tensor:
        """The recorded amaxes of ``role`` ([k] fp32, k <= history length, in ring order)."""
        self._check(role)
        k = min(int(getattr(self, f"steps_{role}")), self.config.history)
        return getattr(self, f"amax_{role}")[:k]

    def reference_amax(self, role: str) -> Tensor | None:
        """``2**margin * max(history)`` (0-d fp32), or None before the first record."""
        h = self.history(role)
        return None if h.numel() == 0 else h.max() * 2.0 ** self.config.margin

    def record(self, role: str, amax: Tensor) -> None:
        """Append ``amax`` (0-d) to the ring buffer of ``role``, dropping the oldest when full."""
        self._check(role)
        steps = getattr(self, f"steps_{role}")
        buf = getattr(self, f"amax_{role}")
        buf[int(steps) % self.config.history] = amax.detach().float()
        steps += 1


def quantize_with_amax(t: Tensor, spec: QuantSpec, amax: Tensor, *,
                       generator: torch.Generator | None = None) -> Tensor:
    """Fake-quantize ``t`` (any shape, float) per tensor with the fixed scale of range ``[-amax, amax]``.

    ``amax``: 0-d, > 0 (a zero or non-finite amax gives the scale rules' degenerate/NaN handling).
    Returns fp32 values of ``t``'s shape; elements beyond ``amax`` saturate to ``±element.max * s``.
    """
    check_delayed_spec(spec, "given")
    hi = amax.detach().float().reshape(1).to(t.device)
    sc = scales_for_range(-hi, hi, spec, None)
    seed = draw_seed(generator) if spec.rounding is Rounding.STOCHASTIC else 0
    X = t.detach().float().reshape(1, -1)  # [1, numel]
    return qdq_groups(X, sc, spec, seed, "torch").reshape(t.shape)


def delayed_quantize(t: Tensor, spec: QuantSpec, state: ScalingState, role: str, *,
                     generator: torch.Generator | None = None) -> Tensor:
    """Quantize ``t`` with the delayed scale of ``role`` (current scaling on the first step), then
    record ``amax(|t|)`` in the role's history. Returns fp32 of ``t``'s shape."""
    check_delayed_spec(spec, role)
    ref = state.reference_amax(role)
    if ref is None:
        out = fake_quantize(t.detach().float(), spec, generator=generator)
    else:
        out = quantize_with_amax(t, spec, ref, generator=generator)
    state.record(role, t.detach().abs().amax() if t.numel() else t.new_zeros(()))
    return out


def predicted_quantize(t: Tensor, spec: QuantSpec, state: ScalingState, role: str, *,
                       generator: torch.Generator | None = None) -> Tensor:
    """Quantize a weight operand ``t`` with its role's predicted amax (see the module docstring).
    Returns fp32 of ``t``'s shape."""
    check_delayed_spec(spec, role)
    amax, exact = state.predicted_amax(role, t)
    if exact:
        return fake_quantize(t.detach().float(), spec, generator=generator)
    return quantize_with_amax(t, spec, amax, generator=generator)
