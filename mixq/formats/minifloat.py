"""Minifloats of any exponent/mantissa split (ExMy), from FP4 to FP32.

Layout of a code: ``[sign][exponent: E bits][mantissa: M bits]`` (no sign bit when unsigned).
Value of exponent field ``F`` and mantissa ``m``: ``2**(F - bias) * (1 + m / 2**M)`` for ``F > 0``,
``2**(1 - bias) * m / 2**M`` for ``F == 0`` (subnormals; zero when subnormals are off).

Special values, as the OCP and IEEE conventions name them:

- ``ieee``: the all-ones exponent holds inf (mantissa 0) and NaN (otherwise);
- ``fn``: finite, and only the all-ones code is NaN (OCP FP8 E4M3);
- ``fnuz``: finite, NaN at the negative-zero code, no negative zero, bias one larger;
- ``none``: every code is a finite number (OCP FP6 and FP4).

Overflow saturates to ``max`` by default (the choice of the OCP MX specification and of
quantization in general); with ``saturate=False`` it gives inf (``ieee``) or NaN (``fn``/``fnuz``),
as IEEE casts and ml_dtypes do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.formats.base import Rounding, ScalarFormat, round_integers

SPECIALS = ("ieee", "fn", "fnuz", "none")


def pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0**k`` (float64) for integer tensors ``k`` in [-1022, 1023], built from the bits."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """``floor(log2(a))`` (int64) for positive finite float64 ``a``, exact (from frexp)."""
    return torch.frexp(a).exponent.to(torch.int64) - 1


def default_specials(exponent_bits: int, mantissa_bits: int) -> str:
    """OCP/IEEE convention for a bare ``eXmY``: ieee from 5 exponent bits, fn for E4M3, else none."""
    if exponent_bits >= 5:
        return "ieee"
    if (exponent_bits, mantissa_bits) == (4, 3):
        return "fn"
    return "none"


@dataclass(frozen=True)
class FloatFormat(ScalarFormat):
    """A binary floating-point format with ``exponent_bits`` and ``mantissa_bits``.

    ``bias`` defaults to ``2**(E-1) - 1`` (``2**(E-1)`` for fnuz). All values must lie within
    fp32 (max below 2**128, smallest subnormal at least 2**-149) so that emulation in fp32 is exact.
    """

    exponent_bits: int
    mantissa_bits: int
    bias: int | None = None
    subnormals: bool = True
    specials: str = "ieee"
    saturate: bool = True
    is_signed: bool = True

    def __post_init__(self) -> None:
        e, m = self.exponent_bits, self.mantissa_bits
        if not isinstance(e, int) or not 1 <= e <= 8:
            raise ValueError(f"exponent bits must be 1..8, got {e!r}")
        if not isinstance(m, int) or not 0 <= m <= 23:
            raise ValueError(f"mantissa bits must be 0..23, got {m!r}")
        if self.specials not in SPECIALS:
            raise ValueError(f"specials must be one of {SPECIALS}, got {self.specials!r}")
        if self.bias is None:
            object.__setattr__(self, "bias", (1 << (e - 1)) - (0 if self.specials == "fnuz" else 1))
        if self.specials == "ieee" and e < 2:
            raise ValueError("ieee specials need at least 2 exponent bits (the all-ones exponent is reserved)")
        if self.specials == "fnuz" and not self.is_signed:
            raise ValueError("fnuz puts NaN at the negative-zero code: it needs a sign bit")
        if not self.saturate and self.specials == "none":
            raise ValueError("a format without inf/NaN can only saturate on overflow (saturate=True)")
        if self.max_exponent > 127 or self.emin - (m if self.subnormals else 0) < -149:
            raise ValueError(f"{self.name}: values must lie within fp32 (exponents {self.emin}..{self.max_exponent})")

    # --- derived constants -------------------------------------------------------------------
    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def _top_field(self) -> int:
        """Largest exponent field that holds finite values."""
        all_ones = (1 << self.exponent_bits) - 1
        if self.specials == "ieee" or (self.specials == "fn" and self.mantissa_bits == 0):
            return all_ones - 1
        return all_ones

    @property
    def max_exponent(self) -> int:
        return self._top_field - self.bias

    @property
    def _top_mantissa(self) -> int:
        m_all = (1 << self.mantissa_bits) - 1
        return m_all - 1 if self.specials == "fn" and self.mantissa_bits > 0 else m_all

    @property
    def max(self) -> float:
        return 2.0 ** self.max_exponent * (1 + self._top_mantissa / 2 ** self.mantissa_bits)

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def min_subnormal(self) -> float:
        if self.subnormals and self.mantissa_bits > 0:
            return 2.0 ** (self.emin - self.mantissa_bits)
        return self.min_normal

    @property
    def bits(self) -> float:
        return float(self.exponent_bits + self.mantissa_bits + (1 if self.is_signed else 0))

    @property
    def signed(self) -> bool:
        return self.is_signed

    @property
    def num_codes(self) -> int:
        return 1 << int(self.bits)

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.specials != "none" and not (self.specials == "ieee" and self.mantissa_bits == 0)

    @property
    def name(self) -> str:
        e, m = self.exponent_bits, self.mantissa_bits
        parts = [f"{'' if self.is_signed else 'u'}e{e}m{m}"]
        default_bias = (1 << (e - 1)) - (0 if self.specials == "fnuz" else 1)
        if self.bias != default_bias:
            parts[0] += f"b{self.bias}"
        if self.specials != default_specials(e, m):
            parts.append(self.specials)
        if not self.subnormals:
            parts.append("nosub")
        if not self.saturate:
            parts.append("nosat")
        if (e, m) == (8, 0) and len(parts) == 1:
            parts.append(self.specials)  # bare "e8m0" names the OCP exponent-only scale format
        return "_".join(parts)

    # --- numerics ----------------------------------------------------------------------------
    def step_exponent(self, a: torch.Tensor) -> torch.Tensor:
        """Exponent (int64) of the grid spacing around magnitudes ``a`` (float64, >= 0)."""
        e = torch.clamp(floor_log2(a), min=self.emin)
        if self.subnormals:
            return e - self.mantissa_bits
        return torch.where(a < self.min_normal, torch.full_like(e, self.emin), e - self.mantissa_bits)

    def round(self, y: torch.Tensor, rounding: Rounding = Rounding.NEAREST,
              u: torch.Tensor | None = None) -> torch.Tensor:
        y64 = y.double()
        if not self.is_signed:
            y64 = y64.clamp(min=0.0)  # negative values go to the lowest value, zero
        a = y64.abs()
        k = self.step_exponent(torch.where(torch.isfinite(a), a, torch.ones_like(a)))
        step = pow2(k)
        t = a / step  # exact: a power-of-two scaling
        r = round_integers(t, rounding, u)
        if rounding is Rounding.NEAREST and self.mantissa_bits == 0:
            # With no mantissa the tie 1.5 * 2**e sits between two exponent fields: even field wins.
            field_odd = ((k + self.bias) % 2) == 1
            tie = (t == 1.5) & (a >= self.min_normal)
            r = torch.where(tie, 1.0 + field_odd.double(), r)
        q = r * step
        overflow = q > self.max
        if self.saturate:
            q = torch.where(overflow, torch.full_like(q, self.max), q)
        else:
            q = torch.where(overflow, torch.full_like(q, float("inf") if self.has_inf else float("nan")), q)
        negative = torch.signbit(y64)
        if self.specials == "fnuz" or not self.is_signed:
            negative = negative & (q != 0)  # no negative zero in these formats: -0.0 becomes +0.0
        return torch.where(negative, -q, q).float()

    def _nan_code(self) -> int:
        e, m = self.exponent_bits, self.mantissa_bits
        if not self.has_nan:
            raise ValueError(f"{self.name} has no NaN code; the input holds NaN")
        if self.specials == "fnuz":
            return 1 << (e + m)
        if self.specials == "fn":
            return (1 << (e + m)) - 1
        return (((1 << e) - 1) << m) | (1 << (m - 1))  # ieee quiet NaN

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        q = self.round(y).double()
        e, m = self.exponent_bits, self.mantissa_bits
        a = q.abs()
        finite_pos = torch.isfinite(a) & (a > 0)
        safe = torch.where(finite_pos, a, torch.ones_like(a))
        is_normal = finite_pos & (a >= self.min_normal)
        E = floor_log2(safe)
        field = torch.where(is_normal, E + self.bias, torch.zeros_like(E))
        mant_normal = (safe / pow2(E) - 1.0) * (1 << m)
        mant_sub = safe / pow2(torch.full_like(E, self.emin - m))
        mant = torch.where(is_normal, mant_normal, torch.where(finite_pos, mant_sub, torch.zeros_like(safe)))
        code = (field << m) | mant.to(torch.int64)
        if self.is_signed:
            negative = torch.signbit(q) & ~torch.isnan(q)
            if self.specials == "fnuz":
                negative = negative & (a > 0)
            code = code | (negative.to(torch.int64) << (e + m))
        if self.has_inf:
            inf_code = ((1 << e) - 1) << m
            code = torch.where(torch.isinf(q), inf_code | (torch.signbit(q).to(torch.int64) << (e + m)), code)
        nan = torch.isnan(q)
        if bool(nan.any()):
            code = torch.where(nan, torch.full_like(code, self._nan_code()), code)
        return code.to(torch.int32)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        e, m = self.exponent_bits, self.mantissa_bits
        c = codes.to(torch.int64)
        field = (c >> m) & ((1 << e) - 1)
        mant = (c & ((1 << m) - 1)).double()
        sign = ((c >> (e + m)) & 1).bool() if self.is_signed else torch.zeros_like(c, dtype=torch.bool)
        normal = pow2(field - self.bias) * (1.0 + mant / (1 << m))
        sub = mant * (2.0 ** (self.emin - m)) if self.subnormals else torch.zeros_like(mant)
        v = torch.where(field == 0, sub, normal)
        v = torch.where(sign, -v, v)
        all_ones = (1 << e) - 1
        nan = torch.zeros_like(sign)
        if self.specials == "ieee":
            top = field == all_ones
            v = torch.where(top & (mant == 0), torch.where(sign, -torch.inf, torch.inf), v)
            nan = top & (mant != 0)
        elif self.specials == "fn":
            nan = (field == all_ones) & (mant == (1 << m) - 1)
        elif self.specials == "fnuz":
            nan = sign & (field == 0) & (mant == 0)
        return torch.where(nan, torch.nan, v).float()
