"""What an export holds, whatever its file format: per layer, the codes of its weight and its quantizers.

:func:`quantized_layers` reads them off a fake-quantized model (the runner's result, or a loaded run
folder) and checks that every weight lies exactly on its grid; :func:`fill` turns them back into the
fake-quant model. Every writer (mixq's manifest format, compressed-tensors) and every reader goes
through these two, so an exported model loads to exactly the model that was evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mixq.model.plan_match import ResolvedPlan
from mixq.model.qmodules import ActQuantizer, QuantLinear, set_enabled
from mixq.model.quantizers import install_quantizers
from mixq.model.tree import get_module, set_weight_matrix, weight_matrix
from mixq.quant import QuantizedTensor, QuantSpec, dequantize
from mixq.quant.core import quantize_with_scales, requantize
from mixq.quant.scale import GroupScales


class ExportError(ValueError):
    """A model or plan that cannot be exported, or a checkpoint that cannot be read back."""


@dataclass(frozen=True)
class QuantizedLayer:
    """One layer of an exported model.

    ``weight``: codes and scales of the ``[out, in]`` weight matrix (``weight_matrix`` layout), or None
    when the weight stays in float. ``inputs`` / ``outputs``: the input (activation) and output
    (KV-cache) quantizers. ``static_range``: ``(lo, hi)`` ([in] fp32 each) of a static input quantizer.
    ``hadamard``: the online block-Hadamard size on the input (0: none), ``signs`` its random signs
    ([in] fp32) or None.
    """

    name: str
    weight: QuantizedTensor | None
    inputs: QuantSpec | None = None
    static_range: tuple[Tensor, Tensor] | None = None
    outputs: QuantSpec | None = None
    hadamard: int = 0
    signs: Tensor | None = None


@dataclass
class Exported:
    """A checkpoint read back: the fake-quant model, its layers' codes, the resolved plan, metadata."""

    model: nn.Module
    layers: dict[str, QuantizedLayer]
    resolved: ResolvedPlan
    meta: dict[str, Any] = field(default_factory=dict)


def _weight_codes(name: str, W: Tensor, spec: QuantSpec, sc: GroupScales | None) -> QuantizedTensor:
    try:
        return quantize_with_scales(W, spec, sc) if sc is not None else requantize(W, spec)
    except ValueError as err:
        hint = "" if sc is not None else " (no scales were recorded for it: re-run the quantization with this mixq)"
        raise ExportError(f"layer {name} ({tuple(W.shape)}, {spec}) cannot be packed{hint}: {err}") from None


def quantized_layers(model: nn.Module, resolved: ResolvedPlan,
                     scales: Mapping[str, GroupScales | None] | None = None) -> dict[str, QuantizedLayer]:
    """The layers of a fake-quantized ``model`` that ``resolved`` quantizes or rotates, by module name.

    ``scales``: the scales each weight was quantized with (``QuantizeReport.scales``); without an
    entry the scales are found again by the spec's rule, which only reproduces absmax scales. Raises
    :class:`ExportError` naming the layer when a weight does not lie exactly on its grid.
    """
    scales = scales or {}
    out: dict[str, QuantizedLayer] = {}
    for row in resolved.layers:
        if row.kind == "attention":
            continue
        module = get_module(model, row.name)
        wrapper = module if isinstance(module, QuantLinear) else None
        if row.spec.weights is None and wrapper is None:
            continue
        core = wrapper.inner if wrapper is not None else module
        weight = None
        if row.spec.weights is not None:
            if row.name in scales and scales[row.name] is None:
                raise ExportError(f"layer {row.name} holds weights off its grid (salient rows kept in fp16); "
                                  "such plans can be evaluated but not packed")
            weight = _weight_codes(row.name, weight_matrix(core), row.spec.weights, scales.get(row.name))
        inputs = outputs = static = None
        hadamard, signs = 0, None
        if wrapper is not None:
            hadamard, signs = wrapper.hadamard, wrapper.signs
            if isinstance(wrapper.inputs, ActQuantizer):
                inputs = wrapper.inputs.spec
                if wrapper.inputs.static:
                    static = (wrapper.inputs.lo.detach().clone(), wrapper.inputs.hi.detach().clone())
            if isinstance(wrapper.outputs, ActQuantizer):
                outputs = wrapper.outputs.spec
        out[row.name] = QuantizedLayer(row.name, weight, inputs, static, outputs, hadamard, signs)
    return out


def _plain_name(key: str) -> str:
    return key.replace(".inner.", ".")


def float_tensors(model: nn.Module, layers: Mapping[str, QuantizedLayer]) -> dict[str, Tensor]:
    """The model's state dict without the packed weights, by unwrapped name (no ``.inner``).

    Quantizer buffers (rotation signs, static ranges) are left out: they live in the layers. Tensors
    that share storage (tied embeddings) appear once, under their first name; all are contiguous.
    """
    wrapper_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, QuantLinear))
    packed = {f"{name}.weight" for name, layer in layers.items() if layer.weight is not None}
    seen: set[tuple[int, int]] = set()
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        if key.startswith(wrapper_prefixes) and ".inner." not in key:
            continue  # the wrapper's own buffers: signs, quantizer ranges
        name = _plain_name(key)
        if name in packed:
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if value.numel() and ident in seen:
            continue
        seen.add(ident)
        out[name] = value.detach().contiguous()
    return out


def skeleton(folder: str | Path) -> nn.Module:
    """The model named in ``folder/config.json``, built from the config in fp32 without reading weights."""
    import transformers

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{folder} holds no config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"cannot read {config_path}: {err}") from None
    config_dict = json.loads(config_path.read_text())
    config_dict.pop("quantization_config", None)
    config = config.__class__.from_dict(config_dict)
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        raise ExportError(f"{config_path} names no model class (\"architectures\"); it cannot be rebuilt")
    cls = getattr(transformers, names[0], None)
    if cls is None or not hasattr(cls, "_from_config"):
        raise ExportError(f"{config_path} names the model class {names[0]!r}, which transformers does not have")
    return cls._from_config(config).float().eval()


def fill(model: nn.Module, tensors: Mapping[str, Tensor], layers: Mapping[str, QuantizedLayer],
         resolved: ResolvedPlan) -> nn.Module:
    """Load ``tensors`` and the layers' decoded weights into ``model``; install rotations and quantizers.

    ``tensors``: float tensors by unwrapped name; every name must exist in the model, and every model
    tensor must be given, be a packed weight, or share storage with a given one (tied weights).
    Returns ``model``, fake-quantized, its quantizers enabled, in eval mode.
    """
    state = model.state_dict()
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise ExportError(f"the checkpoint holds tensors the model does not have: {unknown[:5]}")
    packed = {f"{n}.weight" for n, layer in layers.items() if layer.weight is not None}
    with torch.no_grad():
        for key, value in tensors.items():
            target = state[key]
            if target.shape != value.shape:
                raise ExportError(f"tensor {key}: the checkpoint holds {tuple(value.shape)}, "
                                  f"the model expects {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))
        for name, layer in layers.items():
            if layer.weight is not None:
                set_weight_matrix(get_module(model, name), dequantize(layer.weight).float())
    given = {(state[k].untyped_storage().data_ptr(), state[k].storage_offset()) for k in set(tensors) | packed}
    missing = [k for k, v in state.items() if k not in tensors and k not in packed
               and (v.untyped_storage().data_ptr(), v.storage_offset()) not in given]
    if missing:
        raise ExportError(f"the checkpoint lacks tensors of the model: {missing[:5]}")
    install_quantizers(model, resolved, rotate_weights=False)
    for name, layer in layers.items():
        module = get_module(model, name)
        if layer.static_range is not None and isinstance(module, QuantLinear) and module.inputs is not None:
            module.inputs.lo, module.inputs.hi = (t.clone() for t in layer.static_range)
        if layer.signs is not None and isinstance(module, QuantLinear):
            module.signs = layer.signs.clone()
    set_enabled(model, True)
    return model.eval()
