"""Measured degradation with one layer quantized, re-running only the blocks after that layer.

:class:`OutputCache` runs the fp32 model once, block by block, over the calibration batches and keeps
every block's input hidden states ``[B, T, d]`` (fp32, as the model computes them), the last block's
output and the reference (LM: log-softmax of ``lm_head(final_norm(h))``; encoder: the mean-pooled
last hidden state). :meth:`OutputCache.measure` then quantizes one layer, re-runs blocks from that
layer's block to the end plus the head, and compares with the reference: mean per-token
KL(p_ref || p_q) for an LM, mean 1 - cosine of pooled embeddings for an encoder. A layer in block
``b`` of ``N`` costs about ``(N - b) / N`` of a forward pass. The LM head is re-run alone from the
cached last hidden state; any other layer outside the blocks costs one whole-model forward.

Memory: ``(N + 1)`` hidden-state tensors per batch plus the reference (``[B, T, V]`` fp32 per batch
for an LM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mixq.model.arch import ArchFacts, arch_facts
from mixq.model.capture import StopForward, capture_block_inputs
from mixq.model.swap import layer_quantized
from mixq.model.tree import blocks, get_module
from mixq.quant import QuantSpec
from mixq.sensitivity.outputs import divergence, model_device, model_forward, reference_of, to_device

Progress = Callable[[str, int, int], None]


def _block_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _hidden_first(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block call with its hidden states as the first positional argument (moved from ``hidden_states=``)."""
    if args or "hidden_states" not in kwargs:
        if not args:
            raise RuntimeError(f"expected the block's hidden states as its first input, found kwargs {sorted(kwargs)}")
        return args, kwargs
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return (kwargs["hidden_states"],), rest


class OutputCache:
    """Cached fp32 block inputs and reference outputs of ``model`` on ``batches`` (see module doc).

    ``kind``: ``lm`` | ``encoder``. The model must stay unchanged between construction and use
    (apart from the temporary swaps :meth:`measure` makes itself).
    """

    def __init__(self, model: nn.Module, batches: Sequence[dict[str, Tensor]], kind: str,
                 progress: Progress | None = None) -> None:
        self.model = model
        self.kind = kind
        self.facts: ArchFacts = arch_facts(model)
        device = model_device(model)
        self.batches = [to_device(b, device) for b in batches]
        self.block_list = blocks(model, self.facts) if self.facts.blocks else []
        self.final_norm = get_module(model, self.facts.final_norm) if self.facts.final_norm else None
        head_name = self.facts.lm_head if kind == "lm" else None
        self.lm_head_name = head_name
        self.lm_head = get_module(model, head_name) if head_name else None
        if kind == "lm" and self.lm_head is None:
            raise ValueError(f"expected a causal LM with an lm_head for kind 'lm', found {type(model).__name__}")
        report = progress or (lambda stage, done, total: None)
        self.calls: list[tuple[tuple, dict]] = []  # block 0 (args, kwargs) per batch
        self.hidden: list[list[Tensor]] = []  # [block][batch] -> block input [B, T, d]
        self.final: list[Tensor] = []  # [batch] -> last block output
        self.reference: list[Tensor] = []  # [batch] -> reference_of(...)
        with torch.no_grad():
            if self.block_list:
                self.calls = self._capture()
                h = [a[0] for a, _ in self.calls]
                for i in range(len(self.block_list)):
                    report("cache", i, len(self.block_list))
                    self.hidden.append(h)
                    h = [self._run_block(i, j, x) for j, x in enumerate(h)]
                self.final = h
                self.reference = [reference_of(kind, self._head(x), b) for x, b in zip(h, self.batches)]
            else:
                self.reference = [reference_of(kind, model_forward(model, b, kind), b) for b in self.batches]
        report("cache", len(self.block_list), len(self.block_list))

    def _capture(self) -> list[tuple[tuple, dict]]:
        with capture_block_inputs(self.block_list[0][1]) as calls:
            for batch in self.batches:
                try:
                    model_forward(self.model, batch, self.kind)
                except StopForward:
                    pass
        calls = [_hidden_first(a, k) for a, k in calls]
        if len(calls) != len(self.batches):
            raise RuntimeError(f"expected one call of {self.block_list[0][0]} per batch ({len(self.batches)}), "
                               f"found {len(calls)}")
        return calls

    def _run_block(self, i: int, j: int, h: Tensor) -> Tensor:
        args, kwargs = self.calls[j]
        return _block_output(self.block_list[i][1](h, *args[1:], **kwargs))

    def _head(self, h: Tensor) -> Tensor:
        """Raw output from the last block output: LM logits, encoder last hidden state."""
        if self.kind == "encoder":
            return h
        if self.final_norm is not None:
            h = self.final_norm(h)
        assert self.lm_head is not None
        return self.lm_head(h)

    def block_of(self, name: str) -> int | None:
        """Index of the block holding module ``name`` (None when outside every block)."""
        for i, (block_name, _) in enumerate(self.block_list):
            if name.startswith(f"{block_name}."):
                return i
        return None

    def measure(self, name: str, weight: Tensor | None, inputs: QuantSpec | None = None) -> float:
        """Mean degradation (KL per token or 1 - cosine per text) with layer ``name`` given ``weight``
        (``[out, in]``, None: unchanged) and, if ``inputs``, quantized inputs."""
        module = get_module(self.model, name)
        total, count = 0.0, 0
        with torch.no_grad(), layer_quantized(module, weight, inputs):
            start = self.block_of(name)
            for j, batch in enumerate(self.batches):
                if start is not None:
                    h = self.hidden[start][j]
                    for i in range(start, len(self.block_list)):
                        h = self._run_block(i, j, h)
                    out = self._head(h)
                elif name == self.lm_head_name and self.final:
                    out = self._head(self.final[j])
                else:
                    out = model_forward(self.model, batch, self.kind)
                s, n = divergence(self.kind, self.reference[j], out, batch)
                total, count = total + s, count + n
        return total / max(count, 1)
