"""Bits are counted honestly: the one accounting function of mixq.

Every figure of bits per value in mixq (search, reports, export) comes from :func:`bit_count`:
element bits, plus every block scale, zero point and tensor scale. Integer zero points are stored
in the element's width; float offsets (``asymf``) in the scale format. mixq never pads, so there are no padding bits to count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixq.formats import BlockFormat, ScalarFormat
from mixq.quant.granularity import Grouping
from mixq.quant.spec import QuantSpec


@dataclass(frozen=True)
class BitCount:
    """Total bits of one quantized tensor, by part."""

    numel: int
    elements: float
    scales: float
    zero_points: float
    tensor_scale: float

    @property
    def total(self) -> float:
        return self.elements + self.scales + self.zero_points + self.tensor_scale

    @property
    def per_value(self) -> float:
        return self.total / self.numel if self.numel else 0.0

    @property
    def bytes(self) -> float:
        return self.total / 8


def bit_count(spec: QuantSpec | ScalarFormat | BlockFormat | str, shape: tuple[int, ...]) -> BitCount:
    """Bits of a tensor of ``shape`` quantized by ``spec`` (a spec, a format or a spec string)."""
    if not isinstance(spec, QuantSpec):
        spec = QuantSpec.parse(spec) if isinstance(spec, str) else QuantSpec.from_format(spec)
    shape = tuple(int(d) for d in shape)
    numel = math.prod(shape)
    groups = Grouping(shape, spec.granularity).num_groups
    s = spec.scale
    return BitCount(
        numel=numel,
        elements=numel * spec.format.bits,
        scales=groups * s.format.bits,
        zero_points=groups * (s.format.bits if s.offset else spec.format.bits) if s.asymmetric else 0.0,
        tensor_scale=s.tensor_scale.bits if s.tensor_scale is not None else 0.0,
    )


def bits_per_value(spec: QuantSpec | ScalarFormat | BlockFormat | str, shape: tuple[int, ...]) -> float:
    """Bits per value of a tensor of ``shape``, every scale, zero point and tensor scale included."""
    return bit_count(spec, shape).per_value
