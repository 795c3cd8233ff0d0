"""A small communicator over ``torch.distributed``: who am I, how many are we, combine these tensors.

:class:`Comm` wraps one process group (gloo on CPU, NCCL on GPU) with the few collectives mixq
needs: in-place all-reduce (sum, max, min), all-gather of picklable objects, broadcast of an object
and a barrier. ``Comm.single()`` is the one-process communicator: every collective is the identity,
so code written against a :class:`Comm` runs unchanged without ``torch.distributed``.

:func:`process_group_from_env` starts the process group described by the environment ``torchrun``
sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``) and ends it on exit;
with no such environment (or ``WORLD_SIZE=1``) it yields ``Comm.single()``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

BACKENDS = ("gloo", "nccl")
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class DistributedError(RuntimeError):
    """A distributed run that cannot go on (bad environment, ranks that disagree)."""


class Comm:
    """Collectives of one process group; ``group=None`` with ``world_size=1`` is a single process."""

    def __init__(self, rank: int, world_size: int, backend: str | None,
                 device: torch.device | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        # NCCL reduces CUDA tensors only: CPU tensors are staged through this device
        self.device = device if device is not None else torch.device("cpu")

    @classmethod
    def single(cls) -> Comm:
        """The one-process communicator (every collective returns its input)."""
        return cls(0, 1, None)

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes outputs and prints)."""
        return self.rank == 0

    def all_reduce_(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Combine ``tensor`` (any shape/dtype) in place over every rank with ``op`` (sum | max | min)."""
        if op not in _OPS:
            raise ValueError(f"expected a reduction among {', '.join(_OPS)}, found {op!r}")
        if self.world_size == 1:
            return tensor
        if tensor.device == self.device and tensor.is_contiguous():
            dist.all_reduce(tensor, op=_OPS[op])
            return tensor
        staged = tensor.to(self.device).contiguous()
        dist.all_reduce(staged, op=_OPS[op])
        tensor.copy_(staged)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; tensors inside come back on the CPU."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def send_object(self, obj: Any, dst: int) -> None:
        """Send picklable ``obj`` to rank ``dst`` alone (which calls :meth:`recv_object`)."""
        if self.world_size > 1:
            dist.send_object_list([obj], dst=dst)

    def recv_object(self, src: int) -> Any:
        """The object rank ``src`` sent to this rank with :meth:`send_object`."""
        if self.world_size == 1:
            raise DistributedError("recv_object in a single process: there is no other rank to send")
        box: list[Any] = [None]
        dist.recv_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.world_size > 1:
            dist.barrier()


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most 1)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"expected 0 <= rank < world_size, found rank {rank} of {world_size}")
    return n * rank // world_size, n * (rank + 1) // world_size


def env_world() -> tuple[int, int]:
    """``(rank, world_size)`` from the torchrun environment; ``(0, 1)`` when it is not set."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError as err:
        found = f"RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}"
        raise DistributedError(f"expected integer RANK and WORLD_SIZE in the environment, found {found}") \
            from err
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"expected 0 <= RANK < WORLD_SIZE, found RANK={rank} WORLD_SIZE={world}")
    return rank, world


def default_backend() -> str:
    """``nccl`` when every local rank has its own GPU, else ``gloo`` (CPU, or more ranks than GPUs)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world and dist.is_nccl_available():
        return "nccl"
    return "gloo"


@contextmanager
def process_group_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> Iterator[Comm]:
    """The communicator of this torchrun process (``Comm.single()`` when not started by torchrun).

    Starts the default process group (``backend``: gloo | nccl, default :func:`default_backend`) from
    the environment and destroys it on exit; when a process group already exists it is used as it is
    and left running.
    """
    rank, world = env_world()
    if dist.is_available() and dist.is_initialized():
        yield _comm_of_default_group()
        return
    if world == 1:
        yield Comm.single()
        return
    if not dist.is_available():
        raise DistributedError(f"WORLD_SIZE={world} asks for a distributed run, but this torch has no "
                               "torch.distributed; run one process or install a torch with it")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: start the ranks "
                               "with torchrun (e.g. torchrun --nproc_per_node 2 -m mixq quantize ...)")
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise DistributedError(f"expected a backend among {', '.join(BACKENDS)}, found {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        yield _comm_of_default_group()
    finally:
        dist.destroy_process_group()


def _comm_of_default_group() -> Comm:
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
    return Comm(dist.get_rank(), dist.get_world_size(), backend, device)


@contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Inside the block, standard output and error of ranks other than 0 go to ``os.devnull`` (so a
    torchrun command prints its results and progress once); rank 0 and single processes unchanged."""
    import contextlib

    rank, _ = env_world()
    if rank == 0:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
