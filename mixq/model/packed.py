"""Put packed low-precision modules into a model (the only tree edit of the CPU runtime).

:func:`pack_model` replaces each layer that a packed module computes exactly (``mixq.runtime.linear``)
— its ``QuantLinear`` wrapper together with the wrapped linear — by that module; layers no packed
module supports stay fake-quant. :func:`packed_bytes` measures what the model now holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from mixq.model.qmodules import QuantLinear
from mixq.model.tree import get_module, is_hf_conv1d, set_module
from mixq.runtime.linear import PackedLinearW8A8, PackedLinearWeightOnly, supports

if TYPE_CHECKING:
    from mixq.export.layers import QuantizedLayer


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def pack_model(model: nn.Module, layers: Mapping[str, QuantizedLayer], *,
               w8a8_backend: str = "auto", tile_rows: int = 256, onednn_min_rows: int = 1) -> dict[str, str]:
    """Replace every supported layer of ``model`` by a packed module; returns ``name -> kind``.

    ``layers``: the exported layers by module name (the unwrapped names, as ``quantized_layers``
    gives them). Kinds are ``"w8a8"`` and ``"weight_only"``; layers without a fitting packed module
    (or that are not ``nn.Linear`` / HF ``Conv1D``) are left as they are. The replaced module's weight
    is dropped (its parameter is removed from the old module too, so that a reference kept elsewhere
    does not keep the fp32 matrix alive); a weight tied to another module stays with that module.
    ``w8a8_backend``, ``onednn_min_rows`` (W8A8) and ``tile_rows`` (weight-only) are passed to the
    packed modules (``PackedLinearW8A8``: ``auto`` runs inputs of at most 7 bits on oneDNN).
    """
    kinds: dict[str, str] = {}
    for name, layer in layers.items():
        kind = supports(layer)
        if kind is None:
            continue
        module = get_module(model, name)
        core = module.inner if isinstance(module, QuantLinear) else module
        if not _linear_like(core):
            continue
        bias = core.bias.detach() if getattr(core, "bias", None) is not None else None
        if kind == "w8a8":
            packed = PackedLinearW8A8.from_layer(layer, bias, backend=w8a8_backend,
                                                 onednn_min_rows=onednn_min_rows)
        else:
            packed = PackedLinearWeightOnly.from_layer(layer, bias, tile_rows=tile_rows)
        set_module(model, name, packed)
        core._parameters.pop("weight", None)  # drop the fp32 matrix from the discarded module
        kinds[name] = kind
    return kinds


def packed_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model``, each storage counted once (tied weights).

    Packed modules hold their packed codes, scales, zero points and look-up tables as buffers, so
    their storage is counted as it is held in memory; memory a module holds outside torch storages
    (oneDNN's prepacked int8 weights) is added by its ``opaque_bytes()``.
    """
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    for m in model.modules():
        opaque = getattr(m, "opaque_bytes", None)
        total += opaque() if callable(opaque) else 0
    return total
