"""Module-tree access: the quantizable modules, their weights as ``[out, in]`` and their inputs as rows.

Layouts (``weight_matrix`` / ``input_matrix`` columns agree, so ``Y = X @ W.T (+ bias)``):

- ``nn.Linear``: weight ``[out, in]``; inputs ``[..., in]`` flattened to ``[n, in]``;
- Hugging Face ``Conv1D`` (GPT-2): weight stored ``[in, out]``, seen transposed; inputs as Linear;
- ``nn.Conv2d`` / ``nn.Conv1d`` with ``groups == 1``: weight ``[out, in, *k]`` flattened to
  ``[out, in * prod(k)]``; inputs unfolded into patches ``[n_patches, in * prod(k)]`` (im2col, the
  same column order as the flattened weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixq.model.arch import ArchFacts, ArchitectureError
from mixq.model.weights import _conv1d_class


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' Conv1D (GPT-2 style: weight stored ``[in, out]``)."""
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def _kinds() -> tuple[type, ...]:
    cls = _conv1d_class()
    base: tuple[type, ...] = (nn.Linear, nn.Conv2d, nn.Conv1d)
    return base + ((cls,) if cls is not None else ())


def quantizable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module for every nn.Linear, HF Conv1D, nn.Conv2d and nn.Conv1d, in module order."""
    kinds = _kinds()
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _check(module: nn.Module) -> None:
    if not isinstance(module, _kinds()):
        raise ArchitectureError("expected nn.Linear, Conv1D, nn.Conv1d or nn.Conv2d, "
                                f"found {type(module).__name__}")


def weight_as_matrix(module: nn.Module) -> Tensor:
    """The module's weight as ``[out, in_flat]`` in its own dtype: a differentiable view, no copy."""
    _check(module)
    w = module.weight
    return w.t() if is_hf_conv1d(module) else w.reshape(w.shape[0], -1)  # Conv1D stores [in, out]


def matrix_as_weight(module: nn.Module, W: Tensor) -> Tensor:
    """``W`` ``[out, in_flat]`` in the layout (shape and dtype) of ``module.weight``; differentiable."""
    _check(module)
    w = module.weight
    expected = (w.shape[1], w.shape[0]) if is_hf_conv1d(module) else (w.shape[0], w[0].numel())
    if tuple(W.shape) != expected:
        raise ValueError(f"weight matrix of {type(module).__name__} must be {list(expected)}, "
                         f"found {list(W.shape)}")
    return (W.t() if is_hf_conv1d(module) else W.reshape(w.shape)).to(w.dtype)


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight as a new fp32 tensor ``[out, in_flat]`` (a copy: write back with set_weight_matrix)."""
    return weight_as_matrix(module).detach().float().clone()


def set_weight_matrix(module: nn.Module, W: Tensor) -> None:
    """Write ``W`` ``[out, in_flat]`` (any float dtype) into the module in place, keeping its dtype."""
    new = matrix_as_weight(module, W.detach())
    with torch.no_grad():
        module.weight.copy_(new.to(device=module.weight.device))


def _conv_padding(conv: nn.Conv1d | nn.Conv2d) -> list[int]:
    """F.pad amounts (last dim first: left, right, top, bottom) reproducing the conv's padding."""
    k, d = conv.kernel_size, conv.dilation
    if conv.padding == "valid":
        per_dim = [(0, 0)] * len(k)
    elif conv.padding == "same":
        per_dim = []
        for ki, di in zip(k, d):
            total = di * (ki - 1)
            per_dim.append((total // 2, total - total // 2))
    else:
        per_dim = [(p, p) for p in conv.padding]
    return [a for pair in reversed(per_dim) for a in pair]


def _unfold(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Patches of ``x`` ``[N, C, *spatial]`` (or unbatched) as rows ``[N * L, C * prod(k)]``."""
    spatial = len(conv.kernel_size)
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    pad = _conv_padding(conv)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    k, d, s = tuple(conv.kernel_size), tuple(conv.dilation), tuple(conv.stride)
    if spatial == 1:  # treat [N, C, L] as [N, C, 1, L]
        x, k, d, s = x.unsqueeze(2), (1,) + k, (1,) + d, (1,) + s
    cols = F.unfold(x, kernel_size=k, dilation=d, stride=s)  # [N, C*prod(k), L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [N*L, C*prod(k)]


def input_matrix(module: nn.Module, x: Tensor) -> Tensor:
    """The module's input ``x`` as fp32 rows ``[n, in_flat]`` matching the columns of weight_matrix.

    Linear / Conv1D: ``x [..., in]`` -> ``[prod(...), in]``. Conv: im2col patches. A grouped or
    depthwise conv raises ArchitectureError (a per-group Hessian is not supported).
    """
    _check(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            raise ArchitectureError(f"per-group Hessian not supported: {type(module).__name__} has "
                                    f"groups={module.groups}, expected groups=1")
        return _unfold(module, x.float())
    n_in = module.weight.shape[0] if is_hf_conv1d(module) else module.weight.shape[1]
    return x.reshape(-1, n_in).float()


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name`` ("" is the model itself)."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ArchitectureError(f"no module named {name!r} in {type(model).__name__}: {err}") from None


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (not "") by ``new``."""
    if not name:
        raise ArchitectureError("set_module needs a non-empty module name")
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    if child not in parent._modules:
        raise ArchitectureError(f"no module named {name!r} in {type(model).__name__}")
    setattr(parent, child, new)


def blocks(model: nn.Module, facts: ArchFacts) -> list[tuple[str, nn.Module]]:
    """``[("model.layers.0", block), ...]`` for the ModuleList at ``facts.blocks``."""
    path = facts.require("blocks")
    container = get_module(model, path)
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        raise ArchitectureError(f"{path!r} should be a ModuleList of blocks, "
                                f"found {type(container).__name__}")
    return [(f"{path}.{i}", block) for i, block in enumerate(container)]
