"""Data-parallel calibration and sharded sensitivity profiling over ``torch.distributed``.

Start the ranks with ``torchrun`` (``torchrun --nproc_per_node 2 -m mixq quantize ...``) or, from
Python, :func:`run_local`. :mod:`mixq.dist.comm` holds the communicator, :mod:`mixq.dist.reduce` the
statistic reductions and the runner hooks, :mod:`mixq.dist.profile_shard` the profile sharding.
See docs/scaling.md.
"""

from mixq.dist.comm import Comm, DistributedError, process_group_from_env, shard_range
from mixq.dist.local import run_local
from mixq.dist.profile_shard import ShardedProfile
from mixq.dist.reduce import DataParallelHooks, reduce_layer_stats, reduce_observers

__all__ = ["Comm", "DataParallelHooks", "DistributedError", "ShardedProfile", "process_group_from_env",
           "reduce_layer_stats", "reduce_observers", "run_local", "shard_range"]
