"""Emulated low-precision linear layer: its own quantizer for each operand of the three GEMMs.

For ``x`` ([..., in], flattened to ``X`` [T, in]) and ``W`` ([out, in]):

=========  ===================  ======================================  =============================
GEMM       computes             operands (each [outer, reduction])      roles
=========  ===================  ======================================  =============================
forward    ``Y = X W^T + b``    ``X`` [T, in], ``W`` [out, in]          ``input``, ``weight``
dgrad      ``dX = dY W``        ``dY`` [T, out], ``W^T`` [in, out]      ``grad_output``, ``dgrad_weight``
wgrad      ``dW = dY^T X``      ``dY^T`` [out, T], ``X^T`` [in, T]      ``wgrad_grad_output``,
                                                                        ``wgrad_input``
=========  ===================  ======================================  =============================

Every operand is fake-quantized as its GEMM reads it: a matrix with the reduction dimension last.
So ``g32`` blocks (MX) run along the reduction dimension as block-scaled hardware requires, and
``token`` / ``channel`` give one scale per outer row (the scales of an integer GEMM factor out of
the sums). A ``bRxC`` weight tile with ``R == C`` is transpose-invariant: forward and dgrad then see
the same quantized ``W`` (NVFP4 pretraining's 2-D weight blocks). ``None`` keeps an operand in fp32,
and so does a spec whose element format is fp32 itself (fp32 is the compute precision; its scaled
round trip would only add a double rounding).

``hadamard_wgrad = b`` applies a random block Hadamard ``M`` (order ``b``, random signs drawn from
``seed``, fixed across steps) along the token axis of both wgrad operands before they are
quantized: ``(dY^T M^T)(X^T M^T)^T = dY^T X`` since ``M^T M = I``, so only the quantization sees it.
Stochastic rounding (``:sr`` specs) draws its seeds from the ``generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixq.algorithms.hadamard import block_hadamard, hadamard_order_supported, random_signs
from mixq.quant import QuantSpec, fake_quantize
from mixq.quant.spec import FP32
from mixq.training.scaling import (PREDICTED_ROLES, DelayedScaling, PredictedScaling, ScalingState, check_delayed_spec,
                                   delayed_quantize, predicted_quantize)

ROLES = ("input", "weight", "grad_output", "dgrad_weight", "wgrad_grad_output", "wgrad_input")
Observer = Callable[[str, Tensor], None]


def _spec(value: Any, role: str) -> QuantSpec | None:
    if value is None or isinstance(value, QuantSpec):
        return value
    if isinstance(value, str):
        return QuantSpec.parse(value)
    raise TypeError(f"the {role} format must be a QuantSpec, a spec string or None, "
                    f"got {type(value).__name__}")


@dataclass(frozen=True)
class GemmFormats:
    """Quantizers (QuantSpec, or None for fp32) of the six GEMM operands; strings are parsed.

    See the module docstring for the roles and layouts. ``hadamard_wgrad``: random Hadamard block
    order on the wgrad operands' token axis (0: off). ``seed``: seed of the Hadamard signs.
    """

    input: QuantSpec | None = None
    weight: QuantSpec | None = None
    grad_output: QuantSpec | None = None
    dgrad_weight: QuantSpec | None = None
    wgrad_grad_output: QuantSpec | None = None
    wgrad_input: QuantSpec | None = None
    hadamard_wgrad: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for role in ROLES:
            object.__setattr__(self, role, _spec(getattr(self, role), role))
        b = self.hadamard_wgrad
        if not isinstance(b, int) or b < 0 or (b and not hadamard_order_supported(b)):
            raise ValueError(f"hadamard_wgrad must be 0 (off) or a Hadamard order such as 16 or 32, "
                             f"got {b!r}")

    @staticmethod
    def of(forward: QuantSpec | str | None = None, backward: QuantSpec | str | None = None, *,
           weight: QuantSpec | str | None = None, hadamard_wgrad: int = 0, seed: int = 0) -> "GemmFormats":
        """``forward`` for X and W everywhere (``weight``, if given, for W in forward and dgrad);
        ``backward`` for dY in dgrad and wgrad."""
        w = forward if weight is None else weight
        return GemmFormats(input=forward, weight=w, grad_output=backward, dgrad_weight=w,
                           wgrad_grad_output=backward, wgrad_input=forward, hadamard_wgrad=hadamard_wgrad,
                           seed=seed)

    def spec(self, role: str) -> QuantSpec | None:
        if role not in ROLES:
            raise KeyError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        return getattr(self, role)

    def with_(self, **changes: Any) -> "GemmFormats":
        """A copy with some fields changed (spec strings accepted)."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(changes) - known)
        if bad:
            raise TypeError(f"unknown GemmFormats fields {bad}; fields: {', '.join(sorted(known))}")
        return replace(self, **changes)

    def describe(self) -> str:
        parts = [f"{r}={self.spec(r) if self.spec(r) is not None else 'fp32'}" for r in ROLES]
        if self.hadamard_wgrad:
            parts.append(f"hadamard_wgrad={self.hadamard_wgrad}")
        return ", ".join(parts)


def is_identity(spec: QuantSpec | None) -> bool:
    """Whether an operand with this spec stays exactly as it is (None, or fp32 elements)."""
    return spec is None or spec.format == FP32


def quantize_operand(t: Tensor, formats: GemmFormats, role: str, *, state: ScalingState | None = None,
                     generator: torch.Generator | None = None, observer: Observer | None = None) -> Tensor:
    """Fake-quantize one GEMM operand ``t`` ([outer, reduction] float) by its role's spec.

    Roles listed in ``state.roles`` use delayed scaling, those in ``state.predicted_roles`` predicted
    scaling, the others current scaling. Returns ``t`` itself
    for identity specs, else fp32 of ``t``'s shape. ``observer(role, result)`` is called if given.
    """
    spec = formats.spec(role)
    if is_identity(spec):
        out = t
    elif state is not None and role in state.roles:
        out = delayed_quantize(t, spec, state, role, generator=generator)
    elif state is not None and role in state.predicted_roles:
        out = predicted_quantize(t, spec, state, role, generator=generator)
    else:
        out = fake_quantize(t.detach(), spec, generator=generator)
    if observer is not None:
        observer(role, out)
    return out


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, formats: GemmFormats,
                state: ScalingState | None, generator: torch.Generator | None,
                observer: Observer | None) -> Tensor:
        lead, n_in = x.shape[:-1], x.shape[-1]
        X = x.reshape(-1, n_in)                                             # [T, in]
        Xq = quantize_operand(X, formats, "input", state=state, generator=generator, observer=observer)
        Wq = quantize_operand(weight, formats, "weight", state=state, generator=generator, observer=observer)
        Y = F.linear(Xq.to(x.dtype), Wq.to(weight.dtype), bias)            # [T, out]
        ctx.save_for_backward(X, weight)
        ctx.formats, ctx.state, ctx.generator, ctx.observer = formats, state, generator, observer
        ctx.has_bias = bias is not None
        return Y.reshape(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        X, W = ctx.saved_tensors                                             # [T, in], [out, in]
        f, kw = ctx.formats, {"state": ctx.state, "generator": ctx.generator, "observer": ctx.observer}
        dY = dy.reshape(-1, W.shape[0])                                      # [T, out]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dYq = quantize_operand(dY, f, "grad_output", **kw)
            Wd = quantize_operand(W.t(), f, "dgrad_weight", **kw).t()       # [out, in]
            dx = dYq.to(dy.dtype).mm(Wd.to(dy.dtype)).reshape(*dy.shape[:-1], W.shape[1])
        if ctx.needs_input_grad[1]:
            A, B = dY.t(), X.t()                                             # [out, T], [in, T]
            if f.hadamard_wgrad:
                signs = random_signs(A.shape[1], f.seed)                     # [T]
                A, B = _rotate(A, f.hadamard_wgrad, signs), _rotate(B, f.hadamard_wgrad, signs)
            Aq = quantize_operand(A, f, "wgrad_grad_output", **kw)
            Bq = quantize_operand(B, f, "wgrad_input", **kw)
            dw = Aq.to(W.dtype).mm(Bq.to(W.dtype).t())                      # [out, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dY.sum(0)
        return dx, dw, db, None, None, None, None


def _rotate(t: Tensor, block: int, signs: Tensor) -> Tensor:
    if t.shape[-1] % block:
        raise ValueError(f"the wgrad Hadamard of order {block} needs a token count divisible by it, "
                         f"got {t.shape[-1]} tokens")
    return block_hadamard(t, block, signs)


def quantized_linear(x: Tensor, weight: Tensor, bias: Tensor | None, formats: GemmFormats,
                     state: ScalingState | None = None, *, generator: torch.Generator | None = None,
                     observer: Observer | None = None) -> Tensor:
    """``Q(X) Q(W)^T + b`` with quantized dgrad and wgrad GEMMs in backward (see the module docstring).

    x: [..., in] float; weight: [out, in]; bias: [out] or None. Returns [..., out] in x's dtype.
    ``state``: amax histories for the roles that use delayed scaling. ``generator`` seeds stochastic
    rounding. ``observer(role, operand)`` sees every quantized operand (tests, statistics).
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input of {x.shape[-1]} features for a weight of shape {tuple(weight.shape)}")
    return _QuantizedLinear.apply(x, weight, bias, formats, state, generator, observer)


class EmulatedLinear(nn.Module):
    """An ``nn.Linear`` whose GEMMs run through :func:`quantized_linear` (shares the linear's parameters).

    ``delayed``: delayed scaling for every per-tensor role (block-scaled roles keep current scaling);
    ``predicted``: MOSS-style predicted scaling for the per-tensor weight roles (``weight``,
    ``dgrad_weight``; they then leave delayed scaling). Their state lives in ``self.scaling``
    (buffers). Stochastic rounding draws from a private generator seeded with ``formats.seed``.
    """

    def __init__(self, linear: nn.Linear, formats: GemmFormats, *,
                 delayed: DelayedScaling | None = None, predicted: PredictedScaling | None = None) -> None:
        super().__init__()
        if not isinstance(formats, GemmFormats):
            raise TypeError(f"formats must be GemmFormats (see mixq.training.recipe), "
                            f"got {type(formats).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.formats = formats
        self.scaling: ScalingState | None = None
        per_tensor = [r for r in ROLES if not is_identity(formats.spec(r)) and _per_tensor(formats.spec(r), r)]
        weights = [r for r in per_tensor if r in PREDICTED_ROLES] if predicted is not None else []
        if delayed is not None or weights:
            self.scaling = ScalingState(delayed, [r for r in per_tensor if r not in weights], predicted, weights)
        self.generator = torch.Generator().manual_seed(formats.seed)

    def forward(self, x: Tensor) -> Tensor:
        return quantized_linear(x, self.weight, self.bias, self.formats, self.scaling,
                                generator=self.generator)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the same parameter objects."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight = self.weight
        if self.bias is not None:
            lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.formats.describe()}"


def _per_tensor(spec: QuantSpec | None, role: str) -> bool:
    try:
        check_delayed_spec(spec, role)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True
