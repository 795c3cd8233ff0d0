"""Calibration statistics of one linear layer's inputs, gathered while its block runs.

What is kept depends on what the layer's spec needs: a Hessian ``H = 2/n X^T X`` (GPTQ, salient
rows, the proxy loss), per-channel absolute maxima (SmoothQuant), the mean input (bias correction)
and a row sample of the inputs (AWQ's scale and clip searches). When smoothing divides the inputs by
``s`` afterwards, :meth:`LayerStats.rescale` updates every statistic exactly (``H -> D^-1 H D^-1``),
so one calibration pass per block suffices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixq.algorithms.hessian import HessianAccumulator


class LayerStats:
    """Accumulates statistics of input rows ``x`` ([n, in] fp32) over calibration batches."""

    def __init__(self, in_features: int, *, hessian: bool, absmax: bool, mean: bool, sample_rows: int,
                 seed: int = 0) -> None:
        self.hessian = HessianAccumulator(in_features) if hessian else None
        self.absmax = torch.zeros(in_features) if absmax else None
        self.sum = torch.zeros(in_features, dtype=torch.float64) if mean else None
        self.count = 0
        self.sample_rows = sample_rows
        self._samples: list[Tensor] = []
        self._sampled = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._H: Tensor | None = None  # the Hessian after a rescale

    def add(self, x: Tensor) -> None:
        """Add input rows: ``x`` [..., in] any float dtype."""
        X = x.detach().reshape(-1, x.shape[-1]).float()  # [n, in]
        if self.hessian is not None:
            self.hessian.add(X)
        if self.absmax is not None:
            torch.maximum(self.absmax, X.abs().amax(0), out=self.absmax)
        if self.sum is not None:
            self.sum += X.sum(0, dtype=torch.float64)
        self.count += X.shape[0]
        if self.sample_rows and self._sampled < self.sample_rows:
            # an even stride over each batch keeps the sample spread over positions and windows
            take = min(self.sample_rows - self._sampled, max(1, self.sample_rows // 8), X.shape[0])
            idx = torch.randperm(X.shape[0], generator=self._generator)[:take].sort().values
            self._samples.append(X[idx].clone())
            self._sampled += take

    @property
    def H(self) -> Tensor | None:
        if self._H is not None:
            return self._H
        return self.hessian.H if self.hessian is not None else None

    @property
    def mean(self) -> Tensor | None:
        return (self.sum / max(self.count, 1)).float() if self.sum is not None else None

    @property
    def sample(self) -> Tensor | None:
        """[m, in] fp32 rows drawn from the inputs (None when no sample was asked for)."""
        return torch.cat(self._samples) if self._samples else None

    def rescale(self, s: Tensor) -> None:
        """The inputs are now ``x / s`` (``s``: [in] > 0): transform every statistic accordingly."""
        inv = 1.0 / s.float()
        H = self.H
        if H is not None:
            self._H = H * inv[:, None] * inv[None, :]
        if self.absmax is not None:
            self.absmax.mul_(inv)
        if self.sum is not None:
            self.sum.mul_(inv.double())
        self._samples = [X * inv for X in self._samples]
