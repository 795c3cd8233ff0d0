"""Integer formats of 1 to 16 bits: signed (two's complement) or unsigned, optionally narrow."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.formats.base import Rounding, ScalarFormat, round_integers


@dataclass(frozen=True)
class IntFormat(ScalarFormat):
    """Integers ``qmin..qmax`` stored in ``bit_width`` bits.

    Signed: two's complement, ``[-2**(b-1), 2**(b-1) - 1]``; ``narrow`` drops the most negative
    code for a symmetric range. Unsigned: ``[0, 2**b - 1]``. Out-of-range inputs saturate.
    Codes are the low ``b`` bits of the two's complement pattern. ``fraction_bits`` makes it a
    fixed-point format: the value of integer ``k`` is ``k / 2**fraction_bits`` (OCP MXINT8 elements
    are ``int8n`` with 6 fraction bits, so that their shared E8M0 scale codes match the specification).
    """

    bit_width: int
    is_signed: bool = True
    narrow: bool = False
    fraction_bits: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bit_width, int) or not 1 <= self.bit_width <= 16:
            raise ValueError(f"integer formats have 1 to 16 bits, got {self.bit_width!r}")
        if self.narrow and not self.is_signed:
            raise ValueError("narrow range applies to signed integers only")
        if not isinstance(self.fraction_bits, int) or not 0 <= self.fraction_bits < self.bit_width:
            raise ValueError(f"fraction bits must be 0..{self.bit_width - 1}, got {self.fraction_bits!r}")
        if self.narrow and self.bit_width == 1:
            raise ValueError("a narrow 1-bit signed integer holds only 0; use 'binary' for {-1, +1}")

    @property
    def qmin(self) -> int:
        if not self.is_signed:
            return 0
        return -(1 << (self.bit_width - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return (1 << (self.bit_width - 1)) - 1 if self.is_signed else (1 << self.bit_width) - 1

    @property
    def name(self) -> str:
        base = f"{'int' if self.is_signed else 'uint'}{self.bit_width}"
        return base + ("n" if self.narrow else "") + (f"f{self.fraction_bits}" if self.fraction_bits else "")

    @property
    def unit(self) -> float:
        """Value of one integer step, ``2**-fraction_bits``."""
        return 2.0 ** -self.fraction_bits

    @property
    def bits(self) -> float:
        return float(self.bit_width)

    @property
    def signed(self) -> bool:
        return self.is_signed

    @property
    def max(self) -> float:
        return self.qmax * self.unit

    @property
    def min_normal(self) -> float:
        return self.unit if self.qmax >= 1 else 0.0

    @property
    def min_subnormal(self) -> float:
        return self.min_normal

    @property
    def num_codes(self) -> int:
        return 1 << self.bit_width

    def round(self, y: torch.Tensor, rounding: Rounding = Rounding.NEAREST,
              u: torch.Tensor | None = None) -> torch.Tensor:
        r = round_integers(y.double() / self.unit, rounding, u)
        return (r.clamp(self.qmin, self.qmax) * self.unit).float()  # NaN stays NaN, +-inf saturate

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        q = self.round(y)
        if torch.isnan(q).any():
            raise ValueError(f"{self.name} has no NaN code; the input holds NaN")
        return ((q.double() / self.unit).to(torch.int32) & ((1 << self.bit_width) - 1)).to(torch.int32)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.int32) & ((1 << self.bit_width) - 1)
        if self.is_signed:
            c = torch.where(c >= (1 << (self.bit_width - 1)), c - (1 << self.bit_width), c)
        v = (c.double() * self.unit).float()
        if self.narrow:  # the most negative pattern is not a value of a narrow format
            v = torch.where(c < self.qmin, torch.full_like(v, float("nan")), v)
        return v
