"""Exponent-only formats such as OCP E8M0, the shared scale of the MX formats."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.formats.base import Rounding, ScalarFormat, checked_uniform
from mixq.formats.minifloat import floor_log2, pow2


@dataclass(frozen=True)
class ExponentFormat(ScalarFormat):
    """Unsigned powers of two ``2**(code - bias)``; the all-ones code is NaN; there is no zero.

    Rounding to nearest sends ties (``1.5 * 2**k``) up, as ml_dtypes and torch do for
    ``float8_e8m0fnu``; values below the smallest power go to it; zero, negative values and NaN
    give NaN. Overflow saturates to ``max`` (``saturate=False``: NaN, as ml_dtypes).
    """

    exponent_bits: int = 8
    bias: int | None = None
    saturate: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.exponent_bits, int) or not 1 <= self.exponent_bits <= 8:
            raise ValueError(f"exponent bits must be 1..8, got {self.exponent_bits!r}")
        if self.bias is None:
            object.__setattr__(self, "bias", (1 << (self.exponent_bits - 1)) - 1)
        lo, hi = -self.bias, (1 << self.exponent_bits) - 2 - self.bias
        if lo < -127 or hi > 127:
            raise ValueError(f"exponents {lo}..{hi} leave the fp32 normal range")

    @property
    def name(self) -> str:
        default = (1 << (self.exponent_bits - 1)) - 1
        base = f"e{self.exponent_bits}m0u" if self.exponent_bits != 8 or self.bias != default else "e8m0"
        if self.bias != default:
            base += f"b{self.bias}"
        return base + ("" if self.saturate else "_nosat")

    @property
    def bits(self) -> float:
        return float(self.exponent_bits)

    @property
    def signed(self) -> bool:
        return False

    @property
    def emin(self) -> int:
        return -self.bias

    @property
    def emax(self) -> int:
        return (1 << self.exponent_bits) - 2 - self.bias

    @property
    def max(self) -> float:
        return 2.0 ** self.emax

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def min_subnormal(self) -> float:
        return self.min_normal

    @property
    def num_codes(self) -> int:
        return 1 << self.exponent_bits

    def round_exponent(self, y: torch.Tensor, rounding: Rounding = Rounding.NEAREST,
                       u: torch.Tensor | None = None) -> torch.Tensor:
        """The exponent (int64) ``k`` of the chosen ``2**k``; NaN inputs map to ``emax + 1``."""
        a = y.double()
        ok = torch.isfinite(a) & (a > 0)
        safe = torch.where(ok, a, torch.ones_like(a))
        k = floor_log2(safe)
        t = safe / pow2(k)  # in [1, 2)
        if rounding is Rounding.NEAREST:
            up = t >= 1.5
        elif rounding is Rounding.STOCHASTIC:
            up = (2.0 - t) <= checked_uniform(u, a)
        else:
            up = torch.zeros_like(ok)
        k = k + up.to(torch.int64)
        k = torch.clamp(k, min=self.emin)
        over = (k > self.emax) | (torch.isinf(a) & (a > 0))
        k = torch.where(over, torch.full_like(k, self.emax if self.saturate else self.emax + 1), k)
        return torch.where(ok | (torch.isinf(a) & (a > 0)), k, torch.full_like(k, self.emax + 1))

    def round(self, y: torch.Tensor, rounding: Rounding = Rounding.NEAREST,
              u: torch.Tensor | None = None) -> torch.Tensor:
        k = self.round_exponent(y, rounding, u)
        v = pow2(torch.clamp(k, max=self.emax))
        return torch.where(k > self.emax, torch.nan, v).float()

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        return (self.round_exponent(y) + self.bias).to(torch.int32)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        k = codes.to(torch.int64) - self.bias
        v = pow2(torch.clamp(k, max=self.emax))
        return torch.where(k > self.emax, torch.nan, v).float()
