"""Number formats: integers, minifloats, exponent-only scales, lookup grids and block-scaled compositions."""

from mixq.formats.base import Rounding, ScalarFormat
from mixq.formats.block import BlockFormat, block_presets
from mixq.formats.exponent import ExponentFormat
from mixq.formats.grid import GridFormat, binary, nf4, power_grid, ternary
from mixq.formats.integer import IntFormat
from mixq.formats.minifloat import FloatFormat
from mixq.formats.registry import Format, UnknownFormatError, get, names, scalar_presets, short_name

__all__ = [
    "BlockFormat", "ExponentFormat", "FloatFormat", "Format", "GridFormat", "IntFormat", "Rounding",
    "ScalarFormat", "UnknownFormatError", "binary", "block_presets", "get", "names", "nf4",
    "power_grid", "scalar_presets", "short_name", "ternary",
]
