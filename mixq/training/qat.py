"""Quantization-aware training driven by a plan: ``prepare_qat`` -> train -> ``convert`` -> export.

``prepare_qat(model, plan)`` replaces every layer the plan quantizes by a :class:`QATLinear`: the
weight ``[out, in_flat]`` passes through an :class:`~mixq.training.lsq.LSQQuantizer` (learned step per
group, initialized by the spec's scale rule, clip search included) or, with ``learn_scales=False``,
through an :class:`~mixq.training.lsq.STEQuantizer` (scales recomputed by the rule on every call);
inputs are fake-quantized dynamically with STE, or (``static_inputs``) with a learned per-tensor step.

``convert(model)`` bakes the quantized weights in: plain modules whose weights lie on the grid, input
quantizers as the PTQ path installs them. :func:`convert_with_scales` also returns the scales per layer
(:class:`~mixq.quant.scale.GroupScales`), which :func:`mixq.export.layers.quantized_layers` takes to pack
the weights exactly::

    resolved = resolve(plan, model)            # keep it: the export reads the original layer names
    prepare_qat(model, resolved); train(model)
    model, scales = convert_with_scales(model)
    layers = quantized_layers(model, resolved, scales)

``lora_qat(model, plan)`` freezes the model, quantizes the matched weights once (frozen quantized base)
and adds trainable low-rank ``A`` ([r, in]), ``B`` ([out, r]); :func:`merge` folds ``alpha / r * B A``
into float weights. Online Hadamard rotations, salient rows and KV-cache specs are not trained here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mixq.model.plan_match import ResolvedLayer, ResolvedPlan, resolve
from mixq.model.qmodules import ActQuantizer, wrap
from mixq.model.quantizers import untie_lm_head
from mixq.model.training_swap import (call_with_weight, matrix_as_weight, modules_of_type, replace_modules,
                                      weight_as_matrix)
from mixq.model.tree import set_module, set_weight_matrix, weight_matrix
from mixq.plan import Plan, PlanError
from mixq.quant.core import qdq_groups
from mixq.quant.granularity import Grouping
from mixq.quant.scale import GroupScales, scales_for_range
from mixq.quant.spec import QuantSpec
from mixq.training.lsq import LSQQuantizer, STEQuantizer

InputQuantizer = LSQQuantizer | STEQuantizer


class QATLinear(nn.Module):
    """A linear-like layer (``inner``: Linear, Conv1D, Conv1d/2d) with fake-quantized weight and inputs.

    ``forward(x) = inner(Q_in(x))`` computed with the weight ``Q_w(W)``; both quantizers pass gradients
    straight through (see :mod:`mixq.training.lsq`). ``inner.weight`` stays the float latent weight.
    """

    def __init__(self, inner: nn.Module, weights: LSQQuantizer | STEQuantizer | None,
                 inputs: InputQuantizer | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.weights = weights
        self.inputs = inputs

    def quantized_weight(self) -> Tensor:
        """``Q_w(W)`` as ``[out, in_flat]`` fp32 (``W`` itself when the weight is not quantized)."""
        W = weight_as_matrix(self.inner).float()
        return self.weights(W) if self.weights is not None else W

    def quantize_input(self, x: Tensor) -> Tensor:
        return self.inputs(x) if self.inputs is not None else x

    def linear(self, x: Tensor) -> Tensor:
        """The layer on an already quantized input ``x``."""
        if self.weights is None:
            return self.inner(x)
        return call_with_weight(self.inner, x, matrix_as_weight(self.inner, self.quantized_weight()))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.quantize_input(x))


def _check_row(row: ResolvedLayer) -> None:
    if row.kind == "attention":
        raise PlanError(f"{row.name}: KV-cache quantization is not trained by QAT; drop the kv spec")
    if row.hadamard:
        raise PlanError(f"{row.name}: online Hadamard rotations are not supported by QAT "
                        f"(hadamard={row.hadamard})")
    if row.spec.options.salient:
        raise PlanError(f"{row.name}: salient fp16 rows are not supported by QAT")
    if row.spec.static_inputs and row.spec.inputs is not None and (
            row.spec.inputs.scale.asymmetric or row.spec.inputs.scale.tensor_scale is not None):
        raise PlanError(f"{row.name}: static (learned) input quantization needs a symmetric spec without a "
                        f"tensor scale, got {row.spec.inputs}")


def _resolved(model: nn.Module, plan: Plan | ResolvedPlan) -> ResolvedPlan:
    resolved = plan if isinstance(plan, ResolvedPlan) else resolve(plan, model)
    for row in resolved.layers:
        if row.quantized:
            _check_row(row)
    untie_lm_head(model, resolved)
    return resolved


def _input_quantizer(spec: QuantSpec | None, static: bool, learn: bool,
                     device: torch.device) -> InputQuantizer | None:
    if spec is None:
        return None
    return LSQQuantizer(spec, learn=learn).to(device) if static else STEQuantizer(spec)


def prepare_qat(model: nn.Module, plan: Plan | ResolvedPlan, *, learn_scales: bool = True) -> nn.Module:
    """Wrap, in place, every layer ``plan`` quantizes in a :class:`QATLinear`; returns ``model``.

    ``plan``: a Plan, or the ResolvedPlan of ``model`` (keep it for export: the layer names it holds
    are those of the converted model). ``learn_scales``: learned steps (LSQ) for weights and static
    inputs; otherwise weights are fake-quantized with scales recomputed each call, static input steps
    are fixed at their first batch. The plan's algorithm is not used (QAT replaces it). Raises
    PlanError for rows QAT does not train (KV cache, Hadamard, salient rows).
    """
    resolved = _resolved(model, plan)

    def make(name: str, module: nn.Module) -> nn.Module:
        spec = rows[name].spec
        device = module.weight.device
        weights = None
        if spec.weights is not None:
            weights = LSQQuantizer(spec.weights, weight_matrix(module), learn=True).to(device) \
                if learn_scales else STEQuantizer(spec.weights)
        inputs = _input_quantizer(spec.inputs, spec.static_inputs, learn_scales, device)
        return QATLinear(module, weights, inputs)

    rows = {row.name: row for row in resolved.layers if row.kind != "attention" and row.quantized}
    replace_modules(model, rows, make)
    return model


def learned_scales(model: nn.Module) -> dict[str, GroupScales]:
    """Per :class:`QATLinear` name, the scales its weight quantizer uses now (for export)."""
    out: dict[str, GroupScales] = {}
    for name, layer in modules_of_type(model, QATLinear).items():
        if isinstance(layer.weights, LSQQuantizer):
            out[name] = layer.weights.scales()
        elif isinstance(layer.weights, STEQuantizer):
            out[name] = layer.weights.scales_of(weight_as_matrix(layer.inner).detach().float())
    return out


def _static_range(q: LSQQuantizer, channels: int) -> tuple[Tensor, Tensor]:
    """Per-channel ``(lo, hi)`` ([C] fp32) from which :class:`ActQuantizer` derives exactly ``q``'s step."""
    s = q.scales().scale  # [1]
    h = s * q.spec.format.max
    for _ in range(16):  # h = s * max, nudged by ulps until the scale rule gives s back bit for bit
        got = scales_for_range(-h, h, q.spec, None).scale
        if torch.equal(got, s):
            return (-h).expand(channels).clone(), h.expand(channels).clone()
        h = torch.nextafter(h, torch.full_like(h, math.inf if bool(got < s) else 0.0))
    raise ValueError(f"no input range reproduces the learned step {float(s)} under {q.spec}")


def _act_quantizer(layer: QATLinear) -> ActQuantizer | None:
    q = layer.inputs
    if q is None:
        return None
    channels = weight_matrix(layer.inner).shape[1]
    static = isinstance(q, LSQQuantizer)
    act = ActQuantizer(q.spec, static=static, channels=channels)
    if static:
        if not bool(q.initialized):
            raise RuntimeError("a static input quantizer never saw data: run a forward pass before convert")
        act.lo, act.hi = _static_range(q, channels)
    act.enabled = True
    return act


def convert_with_scales(model: nn.Module) -> tuple[nn.Module, dict[str, GroupScales]]:
    """Bake every :class:`QATLinear` in place: weight <- ``Q_w(W)`` (on the grid), input quantizers become
    :class:`~mixq.model.qmodules.ActQuantizer` (enabled) in a QuantLinear, as PTQ installs them.

    Returns ``model`` and the weight scales per layer name (the ``scales`` argument of
    :func:`mixq.export.layers.quantized_layers`). The converted model's output equals the QAT model's.
    """
    scales = learned_scales(model)
    for name, layer in modules_of_type(model, QATLinear).items():
        with torch.no_grad():
            set_weight_matrix(layer.inner, layer.quantized_weight())
        act = _act_quantizer(layer)
        set_module(model, name, layer.inner)
        if act is not None:
            wrap(model, name, inputs=act.to(layer.inner.weight.device))
    return model, scales


def convert(model: nn.Module) -> nn.Module:
    """:func:`convert_with_scales` without the scales (enough when the spec's rule finds them again)."""
    return convert_with_scales(model)[0]


class LoRALinear(nn.Module):
    """A frozen quantized layer plus a trainable low-rank update: ``y = base(x_q) + alpha/r * x_q A^T B^T``.

    ``base``: a :class:`QATLinear` over a Linear or Conv1D (inputs ``[..., in]``); ``x_q`` is its
    quantized input, so the update sees exactly what the base multiplies. ``A``: [r, in] (Kaiming
    uniform), ``B``: [out, r] (zeros: the update starts at 0).
    """

    def __init__(self, base: QATLinear, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(base.inner, (nn.Conv1d, nn.Conv2d)):
            raise ValueError("LoRA-QAT adapts Linear and Conv1D layers, not convolutions")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        out_features, in_features = weight_matrix(base.inner).shape
        device = base.inner.weight.device
        self.base = base
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def delta(self) -> Tensor:
        """The weight update ``alpha / r * B A`` ([out, in] fp32)."""
        return self.scaling * (self.B @ self.A)

    def forward(self, x: Tensor) -> Tensor:
        xq = self.base.quantize_input(x)
        update = (xq.to(self.A.dtype) @ self.A.t()) @ self.B.t()  # [..., out]
        return self.base.linear(xq) + (self.scaling * update).to(xq.dtype)


def lora_qat(model: nn.Module, plan: Plan | ResolvedPlan, rank: int = 8, alpha: float = 16) -> nn.Module:
    """Frozen quantized base + trainable ``A``, ``B`` on every layer the plan quantizes (in place).

    Every existing parameter is frozen; matched weights are fake-quantized once by their spec (scales by
    its rule); inputs are quantized as in :func:`prepare_qat` with fixed scales. Only the LoRA factors
    train. Returns ``model``; fold the updates in with :func:`merge`.
    """
    resolved = _resolved(model, plan)
    for p in model.parameters():
        p.requires_grad_(False)

    def make(name: str, module: nn.Module) -> nn.Module:
        spec = rows[name].spec
        if spec.weights is not None:
            W = weight_matrix(module)  # [out, in]
            grouping = Grouping(tuple(W.shape), spec.weights.granularity)
            sc = STEQuantizer(spec.weights).scales_of(W)
            Wq = qdq_groups(grouping.to_groups(W), sc, spec.weights, 0, "auto")  # [G, n]
            set_weight_matrix(module, grouping.from_groups(Wq))
        inputs = _input_quantizer(spec.inputs, spec.static_inputs, False, module.weight.device)
        return LoRALinear(QATLinear(module, None, inputs), rank, alpha)

    rows = {row.name: row for row in resolved.layers if row.kind != "attention" and row.quantized}
    replace_modules(model, rows, make)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every :class:`LoRALinear` in place: weight <- ``W_q + alpha/r * B A`` (float, off the grid),
    inputs keep their quantizer (an enabled ActQuantizer in a QuantLinear). Returns ``model``."""
    for name, layer in modules_of_type(model, LoRALinear).items():
        inner = layer.base.inner
        with torch.no_grad():
            set_weight_matrix(inner, weight_matrix(inner) + layer.delta())
        act = _act_quantizer(layer.base)
        set_module(model, name, inner)
        if act is not None:
            wrap(model, name, inputs=act.to(inner.weight.device))
    return model
