"""The weight matrices of a model that a weight quantizer acts on, in the ``[out, in]`` layout.

Linear-like modules and their layouts:

- ``nn.Linear``: ``weight`` is ``[out, in]`` already;
- Hugging Face ``Conv1D`` (GPT-2 style): ``weight`` is ``[in, out]``, yielded transposed;
- ``nn.Conv1d/2d/3d``: ``weight`` ``[out, in/groups, *kernel]`` is flattened to
  ``[out, in/groups * prod(kernel)]`` (the im2col view: one row per output channel);
- ``nn.Embedding``: ``[num_embeddings, dim]``, only with ``include_embeddings``.

A tensor shared by several modules is yielded once. A linear whose weight is tied to an embedding
(the ``lm_head`` of SmolLM2) counts as that embedding: left out by default, yielded under the
embedding's name otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        return None
    return Conv1D


def _matrix(module: nn.Module, conv1d: type | None) -> torch.Tensor | None:
    """The module's weight as ``[out, in]`` (a view, no copy) or None if it is not linear-like."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if isinstance(module, nn.Linear):
        return w  # [out, in]
    if conv1d is not None and isinstance(module, conv1d):
        return w.t()  # [in, out] -> [out, in]
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return w.reshape(w.shape[0], -1)  # [out, in/groups, *k] -> [out, in/groups * prod(k)]
    return None


def linear_weights(model: nn.Module, include_embeddings: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(module_name, weight)`` for every linear-like weight of ``model``, in module order.

    ``weight`` is a detached ``[out, in]`` view of the parameter (any dtype; no copy is made), so
    the model must stay alive while the weights are used.
    """
    conv1d = _conv1d_class()
    embeddings = {id(m.weight): name for name, m in model.named_modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    seen: set[int] = set()
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or id(w) in seen:
            continue
        if id(w) in embeddings:
            seen.add(id(w))
            if include_embeddings:
                yield embeddings[id(w)], w.detach()
            continue
        matrix = _matrix(module, conv1d)
        if matrix is not None:
            seen.add(id(w))
            yield name, matrix.detach()


def count_parameters(weights: list[tuple[str, torch.Tensor]]) -> int:
    """Total number of values in a list of ``(name, weight)`` pairs."""
    return sum(w.numel() for _, w in weights)
