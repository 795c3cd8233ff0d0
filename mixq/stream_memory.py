"""The memory a streamed quantization run needs, estimated from shapes before any weight is read.

The figure covers what the run allocates on top of the interpreter and its libraries (torch and
transformers take a few hundred MiB of their own, the same for every model): the weights outside
the blocks, one block read from disk and one being written, the quantization temporaries of the
largest layer, the block's statistics (Hessians, AWQ row samples), and the calibration activations
(the current block's inputs and outputs for every window, plus one batch's attention and MLP
intermediates). All in fp32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from mixq.model.plan_match import ResolvedPlan

FP32 = 4
FP64 = 8
AWQ_SAMPLE_ROWS = 4096
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class MemoryBudgetError(ValueError):
    """The memory budget is smaller than the run needs; the message names the need."""


def parse_size(text: str | int) -> int:
    """Bytes of a size like ``300M``, ``2G``, ``1.5GiB``, ``512k`` or ``1000000`` (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(text))
    if m is None:
        raise ValueError(f"expected a memory size such as 300M, 2G or 1.5GiB, found {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


@dataclass
class MemoryEstimate:
    """Bytes needed by a streamed run, by part."""

    outside: int      # weights outside the blocks (embeddings, final norm, LM head, its untied copy)
    block: int        # the largest block's weights
    io: int           # reading one block (mapped file pages) and writing one (serialized copy)
    work: int         # temporaries of quantizing the largest layer (weight copies, fp64 Hessian inverse)
    statistics: int   # one block's Hessians (sum and normalized copy) and AWQ samples
    activations: int  # calibration inputs and outputs of a block, one batch's intermediates
    slack: int = 0    # a quarter more: allocator fragmentation, temporaries not modeled above

    @property
    def total(self) -> int:
        return (self.outside + self.block + self.io + self.work + self.statistics + self.activations
                + self.slack)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {format_size(v)}" for k, v in vars(self).items())
        return f"{format_size(self.total)} ({parts})"

    def check(self, budget: int | None) -> None:
        """Raise :class:`MemoryBudgetError` when ``budget`` (bytes) is below :attr:`total`."""
        if budget is not None and budget < self.total:
            raise MemoryBudgetError(
                f"expected a memory budget of at least {self.describe()}, found --max-memory "
                f"{format_size(budget)}; raise --max-memory, or lower --samples, --length or --batch-size")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def estimate(model: nn.Module, resolved: ResolvedPlan, block_names: list[str], *,
             tokens: tuple[int, int] | None, batch_size: int, untie: bool) -> MemoryEstimate:
    """Estimate for a meta skeleton ``model`` (shapes only). ``tokens``: ``(samples, length)`` of the
    calibration data when the blocks use it; ``untie``: the LM head gets its own copy of the embedding."""
    sizes = {b: 0 for b in block_names}
    outside = 0
    seen: set[int] = set()
    head = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            head = p.numel() * FP32 if untie else head
            continue
        seen.add(id(p))
        block = next((b for b in block_names if name.startswith(f"{b}.")), None)
        if block is None:
            outside += p.numel() * FP32
        else:
            sizes[block] += p.numel() * FP32
    largest = max(sizes.values(), default=0)
    work = stats = 0
    per_block = {b: 0 for b in block_names}
    for row in resolved.layers:
        if row.kind == "attention" or row.spec.weights is None:
            continue
        out_f, in_f = row.shape[0], _numel(tuple(row.shape[1:]))
        hessian = row.spec.algorithm == "gptq" or row.spec.options.salient > 0
        # copies of W (W0, W, Wq, errors: 8 fp32) and, for GPTQ, of H in fp64 (Cholesky inverse: 8)
        work = max(work, 8 * out_f * in_f * FP32 + (8 * in_f * in_f * FP64 if hessian else 0))
        block = next((b for b in block_names if row.name.startswith(f"{b}.")), None)
        need = 0
        if hessian:
            need += 2 * in_f * in_f * FP32  # the running sum and the normalized H
        if row.spec.algorithm == "awq":
            need += AWQ_SAMPLE_ROWS * in_f * FP32
        if block is not None:
            per_block[block] += need
        else:
            stats = max(stats, need)
    stats = max(stats, max(per_block.values(), default=0))
    acts = 0
    if tokens is not None:
        cfg = model.config
        d = int(cfg.hidden_size)
        inter = int(getattr(cfg, "intermediate_size", None) or 4 * d)
        heads = int(getattr(cfg, "num_attention_heads", 1))
        samples, length = tokens
        b = min(batch_size, samples)
        acts = (2 * samples * length * d * FP32 + samples * length * 8
                + b * length * (3 * inter + 6 * d) * FP32 + b * heads * length * length * FP32)
    parts = (outside + head, largest, 2 * largest, work, stats, acts)
    return MemoryEstimate(*parts, slack=sum(parts) // 4)
