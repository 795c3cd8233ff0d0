"""Where streamed and distributed runs plug into the sequential runner.

:func:`~mixq.algorithms.runner.quantize_model` calls these at fixed points; the defaults do nothing,
so a plain in-memory, single-process run is unchanged. A streamed run (weights read block by block
from disk) fills a block's weights in :meth:`RunHooks.enter_block` and writes and releases them in
:meth:`RunHooks.leave_block`; a resumed run starts at :meth:`RunHooks.start` with saved inputs. A
data-parallel run combines every rank's statistics in :meth:`RunHooks.reduce_stats` and
:meth:`RunHooks.reduce_observers` before any weight is quantized, so all ranks quantize the same
numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from mixq.algorithms.layer_stats import LayerStats
    from mixq.algorithms.report import LayerReport
    from mixq.model.qmodules import ActQuantizer
    from mixq.quant.scale import GroupScales

BlockInputs = list[tuple[tuple, dict]]  # (args, kwargs) of each calibration call of a block


class RunHooks:
    """No-op hooks; subclasses override what they need."""

    def start(self, blocks: list[str]) -> tuple[int, BlockInputs | None]:
        """Index of the first block to quantize and its calibration inputs (None: capture them).

        Blocks before the index are taken as done (a resumed run); their weights are not touched.
        """
        return 0, None

    def enter_block(self, index: int, name: str, block: nn.Module) -> None:
        """Called before block ``index`` is calibrated (its weights must be usable after it)."""

    def block_results(self, index: int, name: str, reports: dict[str, LayerReport],
                      scales: dict[str, GroupScales | None]) -> None:
        """The reports and weight scales of block ``index``'s layers, called just before
        :meth:`leave_block` (a streamed run stages them so that a resumed run reports every layer)."""

    def leave_block(self, index: int, name: str, block: nn.Module, next_inputs: BlockInputs | None) -> None:
        """Called once block ``index`` is quantized; ``next_inputs``: the next block's inputs (None for
        the last block or when no layer needs data)."""

    def reduce_stats(self, stats: list[LayerStats]) -> None:
        """Combine each statistic in place with the other processes' (called once per statistic)."""

    def reduce_observers(self, observers: list[ActQuantizer]) -> None:
        """Combine the observed activation ranges (``lo``/``hi``) in place with the other processes'."""

    def final_hidden(self, hidden: list[Tensor]) -> None:
        """The last block's outputs on the calibration data (only when the run kept them)."""
