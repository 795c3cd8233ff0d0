"""Round to nearest: the spec's own scale rule and rounding, no data; the baseline of every algorithm."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mixq.algorithms.hessian import layer_loss
from mixq.formats import Rounding
from mixq.quant import Grouping, QuantSpec
from mixq.quant import noise
from mixq.quant.core import choose_scales, qdq_groups


@dataclass(frozen=True)
class WeightResult:
    """A quantized weight and how far it is from the original.

    ``weight``: [out, in] fp32 on the grid of the spec; ``loss``: :func:`layer_loss` against ``H``
    (None without ``H``); ``error``: ``||W - weight||_F^2``; ``info``: algorithm-specific facts.
    """

    weight: torch.Tensor
    loss: float | None
    error: float
    info: dict = field(default_factory=dict)


def squared_error(W: torch.Tensor, Wq: torch.Tensor) -> float:
    """``||W - Wq||_F^2`` summed in fp64."""
    return float(((W.float() - Wq.float()) ** 2).sum(dtype=torch.float64))


def rtn(W: torch.Tensor, spec: QuantSpec | str, H: torch.Tensor | None = None) -> WeightResult:
    """``fake_quantize(W, spec)`` for a weight ``W`` ([out, in], any float dtype; computed in fp32).

    ``H`` ([in, in]), if given, fills ``loss``. ``info``: ``seconds`` and ``scales`` (the
    :class:`~mixq.quant.scale.GroupScales` in group order, for export).
    """
    t0 = time.perf_counter()
    spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
    W32 = W.detach().float()
    grouping = Grouping(tuple(W32.shape), spec.granularity)
    seed = noise.draw_seed(None) if spec.rounding is Rounding.STOCHASTIC else 0
    X = grouping.to_groups(W32)  # [G, n]
    sc = choose_scales(X, spec, seed, "auto")
    Wq = grouping.from_groups(qdq_groups(X, sc, spec, seed, "auto"))  # = fake_quantize(W32, spec)
    loss = layer_loss(W32, Wq, H) if H is not None else None
    return WeightResult(Wq, loss, squared_error(W32, Wq), {"seconds": time.perf_counter() - t0, "scales": sc})
