"""Temporary, exactly restored layer swaps: the only module-tree edits a sensitivity profile makes.

:func:`layer_quantized` puts a quantized weight matrix into one module (and, optionally, fake-quantizes
the module's input) for the duration of a ``with`` block, then restores the original weight bit for bit
and removes the hook, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from mixq.model.tree import set_weight_matrix
from mixq.quant import QuantSpec, fake_quantize


def quantize_input(x: Tensor, spec: QuantSpec) -> Tensor:
    """Fake-quantize an activation ``x`` ``[..., C]`` over its last dimension (rows = every other dim).

    Same shape and dtype as ``x``; computed in fp32. This is what a quantized layer does to its input
    (``token`` granularity: one scale per row).
    """
    rows = x.reshape(-1, x.shape[-1])  # [n, C]
    return fake_quantize(rows, spec).reshape(x.shape).to(x.dtype)


@contextmanager
def input_quantized(module: nn.Module, spec: QuantSpec) -> Iterator[None]:
    """Fake-quantize the first input of ``module`` with ``spec`` while inside the block (forward pre-hook)."""

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if args:
            return (quantize_input(args[0], spec),) + tuple(args[1:]), kwargs
        key = next((k for k, v in kwargs.items() if isinstance(v, Tensor)), None)
        if key is None:
            return None
        return args, {**kwargs, key: quantize_input(kwargs[key], spec)}

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def layer_quantized(module: nn.Module, weight: Tensor | None, inputs: QuantSpec | None = None) -> Iterator[None]:
    """Temporarily give ``module`` the weight matrix ``weight`` and, if ``inputs``, quantized inputs.

    ``weight``: ``[out, in_flat]`` (any float dtype; written in the module's dtype via
    :func:`mixq.model.tree.set_weight_matrix`), or None to leave the weight alone. On exit the original
    weight tensor values are copied back exactly and the input hook is removed, also on error.
    """
    saved = module.weight.detach().clone() if weight is not None else None
    try:
        if weight is not None:
            set_weight_matrix(module, weight)
        if inputs is not None:
            with input_quantized(module, inputs):
                yield
        else:
            yield
    finally:
        if saved is not None:
            with torch.no_grad():
                module.weight.copy_(saved)
