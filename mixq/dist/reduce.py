"""Data-parallel calibration: combine every rank's statistics so all ranks quantize the same numbers.

Each rank runs the calibration forward passes on its own contiguous shard of the calibration
windows; before any weight is quantized the statistics are combined over the ranks:

========================  ===========================================  ==========================
statistic                 combination                                  equal to one process
========================  ===========================================  ==========================
Hessian sum ``X^T X``     all-reduce sum (fp64), ``nsamples`` summed   to fp64 rounding; ``H``
                                                                       (fp32) bit for bit (docs)
channel absmax            all-reduce max                               exactly
input sum / count         all-reduce sum (fp64) / sum                  up to the order of fp64 sums
observer ``lo`` / ``hi``  all-reduce min / max                         exactly
AWQ row sample            gathered, rank order, cut to its size        exactly while rank 0's shard
                                                                       fills the sample (see below)
========================  ===========================================  ==========================

AWQ's sample: one process draws ``rows // 8`` rows per block call from the first calls until it
holds ``rows``; rank 0 runs the same first calls with the same generator, so its sample *is* the
first part of one process's. The gathered sample (rank 0's rows, then rank 1's, ... cut to
``rows``) equals one process's when rank 0 alone fills it (at least 8 block calls on its shard);
otherwise the later rows are drawn from the same windows as one process would read, at other
positions within them.

Every rank then quantizes identically (no weights are sent): they hold the same statistics and the
same weights, and the quantized block is needed on every rank anyway to produce its shard's next
inputs. :class:`DataParallelHooks` checks this after each block with a 2-number checksum of the
block's parameters (all-reduced max and min) and stops the run when ranks disagree.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from mixq.algorithms.hooks import BlockInputs, RunHooks
from mixq.algorithms.layer_stats import LayerStats
from mixq.algorithms.report import LayerReport
from mixq.dist.comm import Comm, DistributedError
from mixq.model.qmodules import ActQuantizer
from mixq.quant.scale import GroupScales


def reduce_layer_stats(comm: Comm, stats: list[LayerStats]) -> None:
    """Combine each of ``stats`` in place with the other ranks' (call on every rank, same order)."""
    for st in stats:
        if st._H is not None:
            raise DistributedError("statistics must be combined before smoothing rescales them; "
                                   "reduce_layer_stats was called after LayerStats.rescale")
        acc = st.hessian
        if acc is not None:
            if acc._sum is None:  # no rows on this rank: zeros in the accumulator's own dtype and device
                acc.add(torch.zeros(0, acc.in_features, device=acc.device))
            comm.all_reduce_(acc._sum, "sum")
            acc.nsamples = _sum_int(comm, acc.nsamples)
        if st.absmax is not None:
            comm.all_reduce_(st.absmax, "max")
        if st.sum is not None:
            comm.all_reduce_(st.sum, "sum")
        st.count = _sum_int(comm, st.count)
        if st.sample_rows:
            gather_samples(comm, st)


def gather_samples(comm: Comm, st: LayerStats) -> None:
    """Replace ``st``'s row sample by every rank's rows in rank order, cut to ``st.sample_rows``."""
    local = st.sample  # [m, in] fp32 or None
    parts = comm.all_gather_object(local.cpu() if local is not None else None)
    rows = [p for p in parts if p is not None]
    if not rows:
        return
    device = local.device if local is not None else torch.device("cpu")
    sample = torch.cat(rows)[:st.sample_rows].to(device)  # [<= sample_rows, in]
    st._samples = [sample]
    st._sampled = int(sample.shape[0])


def reduce_observers(comm: Comm, observers: list[ActQuantizer]) -> None:
    """Widen each observer's ``lo``/``hi`` ([C] fp32) to the range seen by every rank."""
    for q in observers:
        comm.all_reduce_(q.lo, "min")
        comm.all_reduce_(q.hi, "max")


def stats_bytes(st: LayerStats) -> int:
    """Bytes of what :func:`reduce_layer_stats` combines for ``st`` (Hessian sum, maxima, sums, sample)."""
    n = 0
    if st.hessian is not None:
        n += st.hessian.in_features ** 2 * 8  # the fp64 sum
    for t in (st.absmax, st.sum):
        n += t.numel() * t.element_size() if t is not None else 0
    sample = st.sample
    return n + (sample.numel() * sample.element_size() if sample is not None else 0)


def _sum_int(comm: Comm, value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    return int(comm.all_reduce_(t, "sum").item())


def block_checksum(block: nn.Module) -> Tensor:
    """``[2]`` fp64: sum and sum of squares of every parameter and buffer of ``block`` (float ones)."""
    total = torch.zeros(2, dtype=torch.float64)
    for t in list(block.parameters()) + list(block.buffers()):
        if t.is_floating_point() and t.numel():
            v = t.detach().double()
            finite = v[torch.isfinite(v)]
            total += torch.stack([finite.sum(), (finite * finite).sum()]).cpu()
    return total


class DataParallelHooks(RunHooks):
    """:class:`~mixq.algorithms.hooks.RunHooks` of one rank of a data-parallel calibration.

    Statistic and observer reductions go over ``comm``; ``start``, ``enter_block``, ``block_results``,
    ``leave_block`` and ``final_hidden`` are passed on to ``inner`` (e.g. a streamed run's hooks) when given.
    ``verify``: after each block, compare a checksum of its weights over the ranks. ``seconds`` and
    ``bytes``: time spent in the reductions and checks, and bytes of the statistics reduced (per rank).
    """

    def __init__(self, comm: Comm, inner: RunHooks | None = None, verify: bool = True) -> None:
        self.comm = comm
        self.inner = inner or RunHooks()
        self.verify = verify
        self.seconds = 0.0
        self.bytes = 0

    def start(self, blocks: list[str]) -> tuple[int, BlockInputs | None]:
        return self.inner.start(blocks)

    def enter_block(self, index: int, name: str, block: nn.Module) -> None:
        self.inner.enter_block(index, name, block)

    def block_results(self, index: int, name: str, reports: dict[str, LayerReport],
                      scales: dict[str, GroupScales | None]) -> None:
        self.inner.block_results(index, name, reports, scales)

    def leave_block(self, index: int, name: str, block: nn.Module, next_inputs: BlockInputs | None) -> None:
        if self.verify and self.comm.world_size > 1:
            t0 = time.perf_counter()
            check_same_weights(self.comm, block, name)
            self.seconds += time.perf_counter() - t0
        self.inner.leave_block(index, name, block, next_inputs)

    def reduce_stats(self, stats: list[LayerStats]) -> None:
        t0 = time.perf_counter()
        reduce_layer_stats(self.comm, stats)
        self.seconds += time.perf_counter() - t0
        self.bytes += sum(stats_bytes(st) for st in stats)

    def reduce_observers(self, observers: list[ActQuantizer]) -> None:
        t0 = time.perf_counter()
        reduce_observers(self.comm, observers)
        self.seconds += time.perf_counter() - t0
        self.bytes += sum(q.lo.numel() * q.lo.element_size() * 2 for q in observers)

    def final_hidden(self, hidden: list[Tensor]) -> None:
        self.inner.final_hidden(hidden)


def check_same_weights(comm: Comm, block: nn.Module, name: str) -> None:
    """Raise :class:`DistributedError` when ``block``'s weights differ between ranks (checksum)."""
    c = block_checksum(block)
    hi, lo = comm.all_reduce_(c.clone(), "max"), comm.all_reduce_(c.clone(), "min")
    if not torch.equal(hi, lo):
        raise DistributedError(f"ranks quantized block {name} differently (weight checksum "
                               f"{lo.tolist()} .. {hi.tolist()}): the ranks must run the same mixq, torch "
                               "and device type")
