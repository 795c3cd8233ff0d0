"""The staging folder of a streamed run as the ranks of a data-parallel run share it.

Rank 0 alone reads and writes the folder (:class:`~mixq.stream_stage.Staging`): the quantized
blocks (every rank holds the same ones), the manifest, and each rank's share of the calibration
inputs, which the other ranks send it block by block (one calibration call at a time, so rank 0
holds at most one other share on top of its own). On resume rank 0 decides where to start, tells
every rank, and sends each its inputs back. With one process (``Comm.single()``) every method is
the plain :class:`~mixq.stream_stage.Staging` call.

Every method is called by every rank in the same order (they contain collectives).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor

from mixq.dist.comm import Comm, DistributedError
from mixq.stream_stage import ResumeError, RunKey, Staging

T = TypeVar("T")


def on_main(comm: Comm, fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0, its (picklable) result returned on every rank.

    An exception on rank 0 is raised there and, on the other ranks, as a :class:`ResumeError` (when
    it was one) or a :class:`~mixq.dist.comm.DistributedError` with the same message, so no rank
    waits for one that gave up.
    """
    if comm.world_size == 1:
        return fn()
    result: Any = None
    failure: tuple[str, str] | None = None
    error: Exception | None = None
    if comm.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - told to the other ranks, then raised
            error, failure = err, (type(err).__name__, str(err))
    result, failure = comm.broadcast_object((result, failure))
    if error is not None:
        raise error
    if failure is not None:
        kind, message = failure
        raise (ResumeError if kind == "ResumeError" else DistributedError)(f"rank 0: {message}")
    return result


class SharedStaging:
    """One streamed run's staging folder, seen from one rank (``stage`` is None except on rank 0)."""

    def __init__(self, comm: Comm, folder: Path, stage: Staging | None, done: int) -> None:
        self.comm = comm
        self.folder = folder
        self.stage = stage
        self.done = done

    @classmethod
    def open(cls, comm: Comm, folder: Path, key: RunKey, resume: bool) -> SharedStaging:
        """Rank 0 opens (``resume``) or starts the folder (:meth:`Staging.open`); all ranks learn ``done``."""
        box: list[Staging] = []

        def start() -> int:
            box.append(Staging.open(folder, key, resume))
            return box[0].done

        done = on_main(comm, start)
        return cls(comm, folder, box[0] if box else None, done)

    @property
    def is_main(self) -> bool:
        return self.comm.is_main

    def first_block(self, blocks: int, *, blocks_data: bool, outside_data: bool) -> int:
        """The block to start from, agreed by all ranks: after the last staged one, or the last block
        again when a run was killed before every rank's final outputs were staged. Raises
        :class:`ResumeError` when inputs the start needs are missing."""

        def decide() -> int:
            assert self.stage is not None
            ranks = range(self.comm.world_size)
            first = self.stage.done
            staged_final = all(self.stage.final_file(r).is_file() for r in ranks)
            if first == blocks and outside_data and not staged_final:
                first = blocks - 1
            if 0 < first < blocks and blocks_data:
                missing = [self.stage.inputs_file(first, r).name for r in ranks
                           if not self.stage.inputs_file(first, r).is_file()]
                if missing:
                    raise ResumeError(f"cannot resume from {self.folder}: expected the calibration inputs of "
                                      f"block {first} ({', '.join(missing)}), found none; rerun without "
                                      "--resume to start over")
            return first

        return on_main(self.comm, decide)

    # --- rank 0 only ---------------------------------------------------------------------------
    def load_block_extras(self, i: int) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, dict]]:
        """Block ``i``'s staged ``(ranges, scales, reports)`` on rank 0; empty on the others."""
        return self.stage.load_block_extras(i) if self.stage is not None else ({}, {}, {})

    def save_block(self, i: int, weights: dict[str, Tensor], ranges: dict[str, Tensor],
                   scales: dict[str, Any], reports: dict[str, dict[str, Any]]) -> None:
        if self.stage is not None:
            self.stage.save_block(i, weights, ranges, scales, reports)

    def mark_done(self, done: int) -> None:
        self.done = done
        if self.stage is not None:
            self.stage.mark_done(done)

    def drop_inputs(self, i: int) -> None:
        if self.stage is not None:
            self.stage.drop_inputs(i)

    def remove(self) -> None:
        if self.stage is not None:
            self.stage.remove()

    # --- every rank's share ----------------------------------------------------------------------
    def save_inputs(self, i: int, inputs: list[Any]) -> None:
        """Stage every rank's ``inputs`` of block ``i`` (list of calibration calls) on rank 0."""
        self._gather(inputs, lambda items, rank: self.stage.save_inputs(i, items, rank))

    def load_inputs(self, i: int) -> list[Any]:
        """This rank's staged inputs of block ``i``."""
        return self._scatter(lambda rank: self.stage.load_inputs(i, rank))

    def save_final(self, hidden: list[Tensor]) -> None:
        """Stage every rank's last-block outputs (one tensor per calibration call) on rank 0."""
        self._gather(hidden, lambda items, rank: self.stage.save_final(items, rank))

    def load_final(self) -> list[Tensor] | None:
        """This rank's staged last-block outputs (None when not staged)."""
        return self._scatter(lambda rank: self.stage.load_final(rank))

    def _gather(self, items: list[Any], save: Callable[[list[Any], int], None]) -> None:
        if not self.is_main:
            self.comm.send_object(len(items), 0)
            for item in items:
                self.comm.send_object(item, 0)
            return
        save(items, 0)
        for rank in range(1, self.comm.world_size):
            n = self.comm.recv_object(rank)
            received = [self.comm.recv_object(rank) for _ in range(n)]
            save(received, rank)
            del received

    def _scatter(self, load: Callable[[int], list[Any] | None]) -> Any:
        if not self.is_main:
            n = self.comm.recv_object(0)
            return None if n is None else [self.comm.recv_object(0) for _ in range(n)]
        for rank in range(1, self.comm.world_size):
            items = load(rank)
            self.comm.send_object(None if items is None else len(items), rank)
            for item in items or []:
                self.comm.send_object(item, rank)
            del items
        return load(0)
