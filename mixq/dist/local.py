"""Run a function on N local processes joined in one gloo process group (tests, notebooks, benchmarks).

``torchrun`` is the way to start a distributed ``mixq`` command; :func:`run_local` does the same
from Python: it picks a free localhost port, spawns ``world_size`` processes, sets the torchrun
environment in each (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
starts the process group and calls ``fn(comm, *args)``. Each process returns its result through a
file; :func:`run_local` returns them in rank order, or raises when a process fails or the time runs out.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from mixq.dist.comm import DistributedError, process_group_from_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(rank: int, world_size: int, port: int, backend: str, threads: int, folder: str,
           fn: Callable[..., Any], args: Sequence[Any]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    path = Path(folder) / f"rank{rank}.pkl"
    try:
        with process_group_from_env(backend, timeout_s=600) as comm:
            result = ("ok", fn(comm, *args))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        result = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    with open(path, "wb") as f:
        pickle.dump(result, f)


def run_local(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *, backend: str = "gloo",
              threads: int = 1, timeout_s: float = 300.0) -> list[Any]:
    """``[fn(comm, *args) on rank r for r in range(world_size)]``, each on its own process.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function). ``threads``: torch threads
    per process. Raises :class:`DistributedError` naming the first failed rank, or on timeout.
    """
    if world_size < 1:
        raise ValueError(f"expected world_size >= 1, found {world_size}")
    with tempfile.TemporaryDirectory(prefix="mixq-dist-") as folder:
        child_args = (world_size, free_port(), backend, threads, folder, fn, tuple(args))
        ctx = mp.start_processes(_child, args=child_args, nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise DistributedError(f"{world_size} local processes still ran after {timeout_s:.0f} s")
        except mp.ProcessException as err:
            raise DistributedError(f"a local rank failed: {err}") from err
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        results = []
        for rank in range(world_size):
            path = Path(folder) / f"rank{rank}.pkl"
            if not path.exists():
                raise DistributedError(f"rank {rank} of {world_size} ended without a result (killed?)")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise DistributedError(f"rank {rank} of {world_size} failed: {value}")
            results.append(value)
        return results

