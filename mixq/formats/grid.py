"""Lookup-grid formats: a sorted list of levels, the code is the level's index.

Covers NF4 (QLoRA's normal-quantile levels), power grids (NUPES-style ``sign(i)|i/q|**p``),
ternary, binary and user-supplied levels. Levels are stored as fp32 values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixq.formats.base import Rounding, ScalarFormat, checked_uniform


@dataclass(frozen=True)
class GridFormat(ScalarFormat):
    """Values are the given ``levels``; codes are indices into the sorted levels.

    Rounding to nearest sends a tie to the level with the even index; stochastic rounding picks
    a neighbour with probability proportional to closeness; toward zero picks the neighbour of
    smaller magnitude. Inputs outside the levels saturate to the end levels.
    """

    levels: tuple[float, ...]
    label: str | None = None
    bit_width: float | None = None

    def __post_init__(self) -> None:
        lv = tuple(sorted({float(torch.tensor(v, dtype=torch.float32)) for v in self.levels}))
        if len(lv) < 2:
            raise ValueError(f"a grid needs at least 2 distinct levels, got {self.levels!r}")
        if not all(math.isfinite(v) for v in lv):
            raise ValueError("grid levels must be finite")
        object.__setattr__(self, "levels", lv)
        if self.bit_width is None:
            object.__setattr__(self, "bit_width", float(max(1, math.ceil(math.log2(len(lv))))))

    @property
    def name(self) -> str:
        return self.label or "grid(" + ",".join(repr(v) for v in self.levels) + ")"

    @property
    def bits(self) -> float:
        return float(self.bit_width)

    @property
    def signed(self) -> bool:
        return self.levels[0] < 0

    @property
    def max(self) -> float:
        return max(abs(self.levels[0]), abs(self.levels[-1]))

    @property
    def min_normal(self) -> float:
        pos = [abs(v) for v in self.levels if v != 0]
        return min(pos)

    @property
    def min_subnormal(self) -> float:
        return self.min_normal

    @property
    def num_codes(self) -> int:
        return len(self.levels)

    def level_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The sorted levels as a float64 tensor on ``device``."""
        return torch.tensor(self.levels, dtype=torch.float64, device=device)

    def round_index(self, y: torch.Tensor, rounding: Rounding = Rounding.NEAREST,
                    u: torch.Tensor | None = None) -> torch.Tensor:
        """Index (int64) of the chosen level for each element of ``y``."""
        L = self.level_tensor(y.device)
        y64 = y.double().contiguous()
        n = L.numel()
        if rounding is Rounding.NEAREST:
            mids = (L[:-1] + L[1:]) / 2  # exact in float64
            idx = torch.searchsorted(mids, y64, side="left")
            tie = mids[idx.clamp(max=n - 2)] == y64
            return torch.where(tie & (idx % 2 == 1), idx + 1, idx).clamp(0, n - 1)
        lo = (torch.searchsorted(L, y64, side="right") - 1).clamp(0, n - 2)
        vlo, vhi = L[lo], L[lo + 1]
        if rounding is Rounding.STOCHASTIC:
            p = ((y64 - vlo) / (vhi - vlo)).clamp(0.0, 1.0)
            return lo + ((1.0 - p) <= checked_uniform(u, y64)).to(torch.int64)
        inside = torch.where(y64 <= vlo, lo, torch.where(y64 >= vhi, lo + 1, -1))
        nearer_zero = torch.where(vhi.abs() < vlo.abs(), lo + 1, lo)
        return torch.where(inside >= 0, inside, nearer_zero)

    def round(self, y: torch.Tensor, rounding: Rounding = Rounding.NEAREST,
              u: torch.Tensor | None = None) -> torch.Tensor:
        v = self.level_tensor(y.device)[self.round_index(y, rounding, u)]
        return torch.where(torch.isnan(y), torch.nan, v).float()

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        if bool(torch.isnan(y).any()):
            raise ValueError(f"{self.name} has no NaN code; the input holds NaN")
        return self.round_index(y).to(torch.int32)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.level_tensor(codes.device)[codes.to(torch.int64)].float()


def nf4() -> GridFormat:
    """QLoRA's NormalFloat4: quantiles of N(0, 1) with an exact zero, normalised to [-1, 1].

    8 positive levels are ``Phi^-1`` at ``linspace(offset, 0.5, 9)[:-1]`` and 7 negative ones at
    ``linspace(offset, 0.5, 8)[:-1]`` with ``offset = 0.9677083`` (about ``1 - (1/32 + 1/30) / 2``),
    evaluated as bitsandbytes does (float32 linspace, float64 quantiles, float32 normalisation), so
    the levels equal the NF4 table of bitsandbytes' kernels bit for bit.
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double()).float()
    neg = (-torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double())).float()
    v = torch.cat([pos, torch.zeros(1), neg]).sort().values
    return GridFormat(tuple((v / v.max()).tolist()), label="nf4", bit_width=4.0)


def power_grid(bits: int, exponent: float) -> GridFormat:
    """NUPES-style power grid: ``sign(i) * (|i| / q)**exponent`` for ``i = -q..q``, ``q = 2**(bits-1) - 1``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"power grids have 2..8 bits, got {bits}")
    if not exponent > 0:
        raise ValueError(f"the power-grid exponent must be positive, got {exponent}")
    q = (1 << (bits - 1)) - 1
    i = torch.arange(-q, q + 1, dtype=torch.float64)
    v = torch.sign(i) * (i.abs() / q) ** exponent
    return GridFormat(tuple(v.tolist()), label=f"pow{bits}_{exponent:g}", bit_width=float(bits))


def ternary() -> GridFormat:
    """{-1, 0, +1}; stored 5 values per byte, so 1.6 bits per value."""
    return GridFormat((-1.0, 0.0, 1.0), label="ternary", bit_width=1.6)


def binary() -> GridFormat:
    """{-1, +1}: one bit per value."""
    return GridFormat((-1.0, 1.0), label="binary", bit_width=1.0)
