"""A sensitivity profile split over processes: (layer × candidate) pairs sharded, tables gathered.

Plugged into :func:`mixq.sensitivity.profile.profile` as its ``hooks``:

- **pairs:** the scored pairs, in the profile's order, go round-robin to the ranks (pair ``k`` to rank
  ``k mod N``: neighbouring pairs share a layer, so every rank gets layers from every block and the
  expensive early-block ``kl`` measurements spread evenly); at the end every rank receives every score.
- **empirical Fisher** (``fisher``): data-parallel. Rank ``r`` runs the backward passes of its
  contiguous share of the batches (batch indices kept global, so an encoder's seeded surrogate is
  the same), and the per-rank means are combined as ``sum_r n_r * mean_r / n`` in fp64 (all-reduce).
- **model Fisher, Hessian traces, the KL cache:** computed by every rank on all batches. Their labels
  and Rademacher vectors come from one generator run through the batches in order, so a shard could
  not draw what one process draws; computing them per rank keeps them equal to one process's.

Equality to one process: every score of a pair depends only on the shared statistics and the pair,
so ``weight``, ``fisher_model``, ``hessian`` and ``kl`` are bit-identical to one process's (same
software, same device type); ``fisher`` differs by the order of its float sums: relative
differences below 1e-5 per score (the test's bound; 4e-9 measured on a tiny Llama).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mixq.dist.comm import Comm, shard_range
from mixq.sensitivity.profile import ProfileHooks


class ShardedProfile(ProfileHooks):
    """:class:`~mixq.sensitivity.profile.ProfileHooks` of one rank of a sharded profile (see module doc)."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm

    def batch_range(self, n: int) -> tuple[int, int]:
        return shard_range(n, self.comm.rank, self.comm.world_size)

    def combine_fisher(self, F: dict[str, Tensor], x_terms: dict[str, list[float]], n_local: int,
                       n_total: int) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
        if self.comm.world_size == 1:
            return F, x_terms
        out: dict[str, Tensor] = {}
        for name, f in F.items():  # [out, in] fp32, mean over this rank's batches
            total = f.double() * n_local
            self.comm.all_reduce_(total, "sum")
            out[name] = (total / max(n_total, 1)).to(f.dtype)
        terms: dict[str, list[float]] = {}
        for name, values in x_terms.items():
            t = torch.tensor(values, dtype=torch.float64) * n_local
            self.comm.all_reduce_(t, "sum")
            terms[name] = (t / max(n_total, 1)).tolist()
        return out, terms

    def owns(self, pair: int) -> bool:
        return pair % self.comm.world_size == self.comm.rank

    def gather(self, scores: dict[str, np.ndarray], seconds: dict[str, np.ndarray],
               owned: list[tuple[int, int]]) -> None:
        mine = {(i, j): ({m: float(a[i, j]) for m, a in scores.items()},
                         {m: float(a[i, j]) for m, a in seconds.items()}) for i, j in owned}
        for part in self.comm.all_gather_object(mine):
            for (i, j), (s, t) in part.items():
                for m, v in s.items():
                    scores[m][i, j] = v
                for m, v in t.items():
                    seconds[m][i, j] = v
