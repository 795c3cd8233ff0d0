"""A description of every named number format: kind, bits per value, range and number of values.

For block formats (MX, NV) ``bits_per_value`` counts the element and the block scale
(``element.bits + scale.bits / block``); a tensor scale is listed separately because its share
depends on the tensor's size. Their ``max``, ``min_normal``, ``min_subnormal`` and ``num_values``
describe the element in its own units (MXFP4: max 6); ``block_max`` is the largest value the
block scale can reach (``element.max * scale.max``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mixq.formats import (BlockFormat, ExponentFormat, FloatFormat, Format, GridFormat, IntFormat,
                          ScalarFormat, get, names, short_name)
from mixq.formats.base import MAX_ENUMERABLE_CODES

if TYPE_CHECKING:
    from rich.table import Table


@dataclass(frozen=True)
class FormatInfo:
    """The constants of one named format, as derived by the format object itself."""

    name: str
    kind: str  # int | fp | e8m0 | grid | block
    bits_per_value: float
    element: str
    scale: str | None  # block formats: "<scale format>/<block>"
    tensor_scale: str | None
    max: float
    min_normal: float
    min_subnormal: float
    num_values: int | None  # None for formats with more than 65,536 codes
    block_max: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def format_kind(fmt: Format) -> str:
    """``int``, ``fp``, ``e8m0`` (exponent-only scale formats), ``grid`` or ``block``."""
    if isinstance(fmt, BlockFormat):
        return "block"
    if isinstance(fmt, IntFormat):
        return "int"
    if isinstance(fmt, FloatFormat):
        return "fp"
    if isinstance(fmt, ExponentFormat):
        return "e8m0"
    if isinstance(fmt, GridFormat):
        return "grid"
    return type(fmt).__name__


def _num_values(fmt: ScalarFormat) -> int | None:
    return len(fmt.values()) if fmt.num_codes <= MAX_ENUMERABLE_CODES else None


def describe_format(name: str) -> FormatInfo:
    """The :class:`FormatInfo` of the format called ``name`` (raises ``UnknownFormatError``)."""
    fmt = get(name)
    if isinstance(fmt, BlockFormat):
        el = fmt.element
        block = "x".join(map(str, fmt.block))
        return FormatInfo(
            name=name, kind="block", bits_per_value=fmt.bits, element=short_name(el),
            scale=f"{short_name(fmt.scale)}/{block}",
            tensor_scale=short_name(fmt.tensor_scale) if fmt.tensor_scale is not None else None,
            max=el.max, min_normal=el.min_normal, min_subnormal=el.min_subnormal,
            num_values=_num_values(el), block_max=fmt.max)
    return FormatInfo(
        name=name, kind=format_kind(fmt), bits_per_value=fmt.bits, element=short_name(fmt), scale=None,
        tensor_scale=None, max=fmt.max, min_normal=fmt.min_normal, min_subnormal=fmt.min_subnormal,
        num_values=_num_values(fmt))


def all_formats() -> list[FormatInfo]:
    """Every named preset of :func:`mixq.formats.names`, scalar then block."""
    return [describe_format(n) for n in names()]


def _num(v: float) -> str:
    return f"{v:.6g}"


def formats_table(infos: list[FormatInfo]) -> Table:
    """A rich table of format descriptions."""
    from rich.table import Table

    table = Table(title="Number formats (block formats: range columns describe the element)",
                  title_justify="left")
    for col in ("name", "kind", "bits/value", "element", "scale/block", "tensor scale", "max",
                "min normal", "min subnormal", "values"):
        table.add_column(col, justify="left" if col in ("name", "kind", "element", "scale/block",
                                                        "tensor scale") else "right")
    for f in infos:
        table.add_row(
            f.name, f.kind, f"{f.bits_per_value:g}", f.element, f.scale or "", f.tensor_scale or "",
            _num(f.max), _num(f.min_normal), _num(f.min_subnormal),
            "-" if f.num_values is None else str(f.num_values))
    return table
