"""The contract every scalar number format fulfils.

A *scalar format* is a finite (or, for fp16/bf16/fp32, very large) set of real values with an
integer code for each. Formats are frozen value objects: equal parameters give equal, hashable
objects, and every constant (max, smallest subnormal, the grid) is derived from the parameters.

Values are handled in the format's own units (an fp4 element lies in [-6, 6]); scaling is the job
of :mod:`mixq.quant`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum

import torch

MAX_ENUMERABLE_CODES = 1 << 16


class Rounding(str, Enum):
    """How a value between two grid points is resolved.

    ``nearest`` is round-to-nearest with ties to the even code; ``stochastic`` rounds up with
    probability equal to the distance from the lower neighbour (unbiased); ``toward_zero``
    truncates the magnitude.
    """

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"
    TOWARD_ZERO = "toward_zero"


class ScalarFormat(ABC):
    """A number format for single values: the element (or scale) type of a quantizer."""

    @property
    @abstractmethod
    def name(self) -> str:
        """Canonical name; ``mixq.formats.get(fmt.name) == fmt``."""

    @property
    @abstractmethod
    def bits(self) -> float:
        """Storage bits per value (ternary packs 5 values per byte: 1.6)."""

    @property
    @abstractmethod
    def signed(self) -> bool:
        """Whether negative values are representable."""

    @property
    @abstractmethod
    def max(self) -> float:
        """Largest finite value."""

    @property
    @abstractmethod
    def min_normal(self) -> float:
        """Smallest positive normal value (for non-float formats: smallest positive value)."""

    @property
    @abstractmethod
    def min_subnormal(self) -> float:
        """Smallest positive value."""

    @property
    @abstractmethod
    def num_codes(self) -> int:
        """Number of distinct codes (bit patterns or indices)."""

    @abstractmethod
    def round(
        self,
        y: torch.Tensor,
        rounding: Rounding = Rounding.NEAREST,
        u: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Round ``y`` (fp32, any shape) onto this format's values; returns fp32 of the same shape.

        ``u`` holds uniform numbers in [0, 1) (float64, shape of ``y``) and is required for
        stochastic rounding. NaN inputs stay NaN; infinities follow the format's overflow policy.
        """

    @abstractmethod
    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Codes (int32, shape of ``y``) of the values nearest to ``y`` (round to nearest first)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Values (fp32, shape of ``codes``) of integer codes; NaN codes decode to NaN."""

    def all_codes(self) -> torch.Tensor:
        """Every code, as int32 ``[num_codes]``; refused for formats with over 65,536 codes."""
        if self.num_codes > MAX_ENUMERABLE_CODES:
            raise ValueError(f"{self.name} has {self.num_codes} codes; enumeration stops at 65536")
        return torch.arange(self.num_codes, dtype=torch.int32)

    def values(self) -> torch.Tensor:
        """All distinct finite representable values, sorted ascending (fp32, 1-D)."""
        v = self.decode(self.all_codes())
        v = v[torch.isfinite(v)]
        return torch.unique(v + 0.0)  # +0.0 folds -0.0 into 0.0

    def __str__(self) -> str:
        return self.name


def checked_uniform(u: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Check that stochastic rounding got its uniform numbers; returns them as float64."""
    if u is None:
        raise ValueError("stochastic rounding needs uniform numbers u (use mixq.quant, which draws them)")
    if u.shape != like.shape:
        raise ValueError(f"u has shape {tuple(u.shape)}, expected {tuple(like.shape)}")
    return u.double()


def round_integers(t: torch.Tensor, rounding: Rounding, u: torch.Tensor | None) -> torch.Tensor:
    """Round float64 ``t`` to integers (float64): half to even, stochastically, or toward zero.

    Stochastic: ``floor(t) + (1 - frac <= u)``, so P(up) = frac (to the 2**-24 resolution of u).
    """
    if rounding is Rounding.NEAREST:
        return torch.round(t)  # half to even
    if rounding is Rounding.TOWARD_ZERO:
        return torch.trunc(t)
    f = torch.floor(t)
    up = (1.0 - (t - f)) <= checked_uniform(u, t)
    return f + up.double()
