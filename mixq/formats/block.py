"""Block-scaled formats as one composition: element format x scale format x block x tensor scale.

MXFP8/6/4 and MXINT8 (OCP MX v1.0: 32 elements sharing an E8M0 scale), NVFP4 (16 elements, E4M3
block scale, fp32 tensor scale), NVINT4 and custom ones are *instances* of :class:`BlockFormat`;
:mod:`mixq.quant` turns any of them into a quantizer (``QuantSpec.from_format``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from mixq.formats.base import ScalarFormat
from mixq.formats.exponent import ExponentFormat
from mixq.formats.integer import IntFormat
from mixq.formats.minifloat import FloatFormat

SCALE_RULES = ("floor", "ceil", "nearest")


def default_scale_rule(scale: ScalarFormat) -> str:
    """``floor`` (the OCP MX rule) for power-of-two scale formats, ``nearest`` otherwise."""
    return "floor" if isinstance(scale, ExponentFormat) else "nearest"


@dataclass(frozen=True)
class BlockFormat:
    """Elements share one scale per block; optionally all blocks share an fp32 tensor scale.

    ``block`` is ``(n,)`` for n consecutive elements along the last axis or ``(r, c)`` for 2-D
    tiles of the last two axes. ``scale_rule`` says how the ideal scale ``amax / element.max`` is
    brought into the scale format: ``floor`` is the OCP MX rule ``2**(floor(log2 amax) - emax_elem)``
    (power-of-two scales only), ``ceil`` rounds up (no element ever clips), ``nearest`` rounds to
    nearest (elements saturate where it rounded down).
    """

    element: ScalarFormat
    scale: ScalarFormat
    block: tuple[int, ...]
    tensor_scale: ScalarFormat | None = None
    scale_rule: str = "floor"
    label: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.element, ExponentFormat):
            raise ValueError("an exponent-only format cannot be a block element")
        if len(self.block) not in (1, 2) or any(int(b) < 1 for b in self.block):
            raise ValueError(f"block must be (n,) or (rows, cols) of positive sizes, got {self.block!r}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}")
        if self.scale_rule == "floor" and not isinstance(self.scale, ExponentFormat):
            raise ValueError("the floor (OCP) scale rule needs a power-of-two scale format such as e8m0")

    @property
    def name(self) -> str:
        """The preset label, or the spec string that builds this composition (``e3m2:g32:e8m0``)."""
        if self.label:
            return self.label
        layout = f"g{self.block[0]}" if len(self.block) == 1 else f"b{self.block[0]}x{self.block[1]}"
        parts = [self.element.name, layout, self.scale.name]
        if self.scale_rule != default_scale_rule(self.scale):
            parts.append(self.scale_rule)
        if self.tensor_scale is not None:
            parts.append(f"ts={self.tensor_scale.name}")
        return ":".join(parts)

    @property
    def block_size(self) -> int:
        n = 1
        for b in self.block:
            n *= b
        return n

    @property
    def bits(self) -> float:
        """Bits per element including the block scale; the tensor scale depends on the shape."""
        return self.element.bits + self.scale.bits / self.block_size

    @property
    def max(self) -> float:
        return self.element.max * self.scale.max

    def __str__(self) -> str:
        return self.name


def block_presets() -> dict[str, BlockFormat]:
    """The named block formats (OCP MX v1.0 and NVIDIA's two-level NV formats); a fresh dict."""
    return dict(_block_presets())


@lru_cache(maxsize=1)
def _block_presets() -> dict[str, BlockFormat]:
    e8m0 = ExponentFormat(8)
    e4m3 = FloatFormat(4, 3, specials="fn")
    fp32 = FloatFormat(8, 23, specials="ieee")
    mx = {
        "mxfp8_e4m3": FloatFormat(4, 3, specials="fn"),
        "mxfp8_e5m2": FloatFormat(5, 2, specials="ieee"),
        "mxfp6_e3m2": FloatFormat(3, 2, specials="none"),
        "mxfp6_e2m3": FloatFormat(2, 3, specials="none"),
        "mxfp4": FloatFormat(2, 1, specials="none"),
        "mxint8": IntFormat(8, narrow=True, fraction_bits=6),  # OCP: values k/64, emax 0
    }
    out = {name: BlockFormat(el, e8m0, (32,), None, "floor", name) for name, el in mx.items()}
    out["nvfp4"] = BlockFormat(FloatFormat(2, 1, specials="none"), e4m3, (16,), fp32, "nearest", "nvfp4")
    out["nvint4"] = BlockFormat(IntFormat(4, narrow=True), e4m3, (16,), fp32, "nearest", "nvint4")
    return out
