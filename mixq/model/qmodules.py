"""Fake-quant module wrappers: what a quantized linear layer does at inference, in fp32 emulation.

``QuantLinear`` wraps a linear-like module (its weight already fake-quantized in place) and adds, on
its input, an optional online block-diagonal Hadamard rotation and an activation quantizer, and on its
output an optional quantizer (used for the K and V projections: KV-cache quantization)::

    x ──► block_hadamard (b) ──► Q_in ──► inner(x) ──► Q_out ──► y

The wrapped module keeps its name under ``.inner``, so calibration hooks on ``inner`` see exactly
the inputs it multiplies. Only ``mixq.model`` edits module trees; these wrappers are installed by
:func:`wrap` and removed by :func:`unwrap`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mixq.algorithms.hadamard import block_hadamard
from mixq.model.tree import get_module, set_module
from mixq.quant import fake_quantize
from mixq.quant.core import qdq_groups
from mixq.quant.granularity import PerTensor
from mixq.quant.scale import scales_for_range, tensor_scale
from mixq.quant.spec import QuantSpec


class ActQuantizer(nn.Module):
    """Activation fake-quantizer over the last dimension of its input.

    Dynamic (``static=False``): scales from each call's values by the spec's granularity (``token``:
    one scale per row). Static: a per-tensor scale fixed from the per-channel ranges observed while
    ``observing`` (``lo``/``hi`` buffers, [C] fp32), which smoothing may rescale. Disabled until
    ``enabled`` is set, so calibration sees the unquantized activations.
    """

    def __init__(self, spec: QuantSpec, static: bool = False, channels: int | None = None) -> None:
        super().__init__()
        if static and not isinstance(spec.granularity, PerTensor):
            raise ValueError(f"static activation quantization uses one per-tensor scale; got {spec}")
        self.spec = spec
        self.static = static
        self.enabled = False
        self.observing = False
        size = channels or 0
        self.register_buffer("lo", torch.full((size,), float("inf")))
        self.register_buffer("hi", torch.full((size,), float("-inf")))

    def observe(self, x: Tensor) -> None:
        """Widen the per-channel range with ``x`` ([..., C])."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if self.lo.numel() != flat.shape[1]:
            self.lo = torch.full((flat.shape[1],), float("inf"))
            self.hi = torch.full((flat.shape[1],), float("-inf"))
        torch.minimum(self.lo, flat.amin(0), out=self.lo)
        torch.maximum(self.hi, flat.amax(0), out=self.hi)

    def rescale(self, s: Tensor) -> None:
        """The inputs were divided by ``s`` ([C] > 0) upstream: divide the observed ranges too."""
        self.lo /= s
        self.hi /= s

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observe(x)
        if not self.enabled:
            return x
        if not self.static:
            return fake_quantize(x, self.spec)
        if not torch.isfinite(self.hi).all():
            raise RuntimeError("static activation quantizer used before calibration")
        lo, hi = self.lo.min().reshape(1), self.hi.max().reshape(1)
        if not self.spec.scale.asymmetric:
            hi = torch.maximum(-lo, hi)
        S = tensor_scale(torch.maximum(-lo, hi), self.spec)
        sc = scales_for_range(lo, hi, self.spec, S)
        X = x.reshape(1, -1).float()
        return qdq_groups(X, sc, self.spec, 0, "auto").reshape(x.shape).to(x.dtype)


class QuantLinear(nn.Module):
    """A linear-like module with an input rotation and input/output quantizers (see the module doc)."""

    def __init__(self, inner: nn.Module, hadamard: int = 0, signs: Tensor | None = None,
                 inputs: ActQuantizer | None = None, outputs: ActQuantizer | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.hadamard = hadamard
        self.register_buffer("signs", signs)
        self.inputs = inputs
        self.outputs = outputs

    def forward(self, x: Tensor) -> Tensor:
        if self.hadamard:
            x = block_hadamard(x, self.hadamard, self.signs)
        if self.inputs is not None:
            x = self.inputs(x)
        y = self.inner(x)
        return self.outputs(y) if self.outputs is not None else y


def wrap(model: nn.Module, name: str, *, hadamard: int = 0, signs: Tensor | None = None,
         inputs: ActQuantizer | None = None, outputs: ActQuantizer | None = None) -> QuantLinear:
    """Replace module ``name`` by a :class:`QuantLinear` around it (or update an existing wrapper)."""
    module = get_module(model, name)
    if isinstance(module, QuantLinear):
        if hadamard:
            module.hadamard, module.signs = hadamard, signs
        module.inputs = inputs or module.inputs
        module.outputs = outputs or module.outputs
        return module
    wrapper = QuantLinear(module, hadamard, signs, inputs, outputs)
    set_module(model, name, wrapper)
    return wrapper


def inner(module: nn.Module) -> nn.Module:
    """The wrapped module of a :class:`QuantLinear`, or the module itself."""
    return module.inner if isinstance(module, QuantLinear) else module


def quantizers(model: nn.Module) -> list[ActQuantizer]:
    """Every activation quantizer in ``model``."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every activation / KV quantizer of ``model`` on or off."""
    for q in quantizers(model):
        q.enabled = enabled


def unwrap(model: nn.Module) -> list[str]:
    """Replace every :class:`QuantLinear` by its inner module; returns the names unwrapped."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        set_module(model, name, get_module(model, name).inner)
    return names
