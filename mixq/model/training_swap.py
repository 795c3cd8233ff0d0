"""Module-tree edits for training: swap layers for trainable wrappers and back, call a layer with a weight.

Training code (``mixq.training``) builds the wrappers; this module only knows module layouts and where
modules sit in the tree. The weight layouts are those of :mod:`mixq.model.tree` (``weight_as_matrix`` and
``matrix_as_weight``, re-exported here): differentiable ``[out, in_flat]`` views, so gradients reach the
parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import Tensor, nn
from torch.func import functional_call

from mixq.model.tree import get_module, matrix_as_weight, set_module, weight_as_matrix


def call_with_weight(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``module(x)`` computed with ``weight`` (the layout of ``module.weight``) in place of its own weight.

    The module itself is not changed; its other parameters and buffers (bias) are used as they are.
    """
    return functional_call(module, {"weight": weight}, (x,))


def replace_modules(model: nn.Module, names: Iterable[str],
                    make: Callable[[str, nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """Replace each module ``name`` of ``model`` by ``make(name, module)``; returns the new ones by name."""
    made: dict[str, nn.Module] = {}
    for name in list(names):
        new = make(name, get_module(model, name))
        set_module(model, name, new)
        made[name] = new
    return made


def modules_of_type(model: nn.Module, kind: type | tuple[type, ...]) -> dict[str, nn.Module]:
    """name -> module for every module of ``kind``, outermost first (nested ones are left out)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, kind) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return found


def replace_modules_of_type(model: nn.Module, kind: type | tuple[type, ...],
                            make: Callable[[str, nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """Replace every (outermost) module of ``kind`` by ``make(name, module)``; returns the new modules."""
    return replace_modules(model, modules_of_type(model, kind), make)


__all__ = ["call_with_weight", "matrix_as_weight", "modules_of_type", "replace_modules",
           "replace_modules_of_type", "weight_as_matrix"]
