"""The one name parser: every format name of mixq goes through :func:`get`.

Names: ``int4``, ``uint8``, ``int4n`` (narrow), ``fp8_e4m3``, ``e4m3``, ``e4m3fnuz``, ``ue4m3``,
``e5m2_nosat``, ``e3m2b5_nosub`` (any ExMy, bias, specials and policy suffixes), ``fp16``,
``bf16``, ``fp32``, ``e8m0``, ``nf4``, ``ternary``, ``binary``, ``pow4_1.5`` (power grid),
``grid(-1.0,-0.25,0.0,0.25,1.0)`` (user levels), and the block formats ``mxfp4``, ``nvfp4``, ….
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache

from mixq.formats.base import ScalarFormat
from mixq.formats.block import BlockFormat, block_presets
from mixq.formats.exponent import ExponentFormat
from mixq.formats.grid import GridFormat, binary, nf4, power_grid, ternary
from mixq.formats.integer import IntFormat
from mixq.formats.minifloat import FloatFormat, default_specials

Format = ScalarFormat | BlockFormat

_FLOAT = re.compile(
    r"^(?:fp(?P<width>\d+)_)?(?P<u>u)?e(?P<e>\d)m(?P<m>\d+)(?:b(?P<bias>-?\d+))?(?P<tag>fnuz|fn)?"
    r"(?P<suffixes>(?:_(?:ieee|fn|fnuz|none|nosub|nosat))*)$"
)
_INT = re.compile(r"^(?P<u>u)?int(?P<bits>\d+)(?P<narrow>n)?(?:f(?P<frac>\d+))?$")
_POW = re.compile(r"^pow(?P<bits>\d+)_(?P<p>[0-9.]+)$")
_GRID = re.compile(r"^grid\((?P<levels>[^()]*)\)$")
_E8M0 = re.compile(r"^e(?P<e>\d)m0u(?:b(?P<bias>-?\d+))?(?P<nosat>_nosat)?$|^e8m0(?P<nosat8>_nosat)?$")


class UnknownFormatError(ValueError):
    """A format name that mixq does not know; the message lists the closest valid names."""


def scalar_presets() -> dict[str, ScalarFormat]:
    """Named scalar formats (integers, OCP/IEEE floats, scale formats, grids); a fresh dict."""
    return dict(_scalar_presets())


@lru_cache(maxsize=1)
def _scalar_presets() -> dict[str, ScalarFormat]:
    out: dict[str, ScalarFormat] = {}
    for b in range(2, 9):
        out[f"int{b}"] = IntFormat(b)
        out[f"uint{b}"] = IntFormat(b, is_signed=False)
    out.update({
        "fp8_e4m3": FloatFormat(4, 3, specials="fn"),
        "fp8_e5m2": FloatFormat(5, 2, specials="ieee"),
        "fp6_e3m2": FloatFormat(3, 2, specials="none"),
        "fp6_e2m3": FloatFormat(2, 3, specials="none"),
        "fp4_e2m1": FloatFormat(2, 1, specials="none"),
        "e8m0": ExponentFormat(8),
        "ue4m3": FloatFormat(4, 3, specials="fn", is_signed=False),
        "ue5m3": FloatFormat(5, 3, specials="ieee", is_signed=False),
        "fp16": FloatFormat(5, 10, specials="ieee"),
        "bf16": FloatFormat(8, 7, specials="ieee"),
        "fp32": FloatFormat(8, 23, specials="ieee"),
        "nf4": nf4(),
        "ternary": ternary(),
        "binary": binary(),
    })
    return out


def short_name(fmt: ScalarFormat) -> str:
    """The preset name of ``fmt`` where it has one (``fp16`` rather than ``e5m10``), else its name."""
    for name, preset in _scalar_presets().items():
        if preset == fmt:
            return name
    return fmt.name


def names() -> list[str]:
    """Every named preset, scalar then block."""
    return list(scalar_presets()) + list(block_presets())


def _parse_float(m: re.Match[str]) -> FloatFormat:
    e, mb = int(m["e"]), int(m["m"])
    suffixes = [s for s in m["suffixes"].split("_") if s]
    specials = [s for s in suffixes if s in ("ieee", "fn", "fnuz", "none")]
    if m["tag"]:
        specials.append(m["tag"])
    if len(specials) > 1:
        raise ValueError(f"more than one special-value policy in {m.string!r}: {specials}")
    fmt = FloatFormat(
        e, mb,
        bias=int(m["bias"]) if m["bias"] is not None else None,
        subnormals="nosub" not in suffixes,
        specials=specials[0] if specials else default_specials(e, mb),
        saturate="nosat" not in suffixes,
        is_signed=not m["u"],
    )
    if m["width"] is not None and int(m["width"]) != fmt.bits:
        raise ValueError(f"{m.string!r}: fp{m['width']} does not match a {int(fmt.bits)}-bit e{e}m{mb}")
    return fmt


def _parse_exponent(m: re.Match[str]) -> ExponentFormat:
    if m["e"] is None:
        return ExponentFormat(8, saturate=not m["nosat8"])
    return ExponentFormat(int(m["e"]), int(m["bias"]) if m["bias"] else None, saturate=not m["nosat"])


def get(name: str) -> Format:
    """The format called ``name`` (case-insensitive); raises :class:`UnknownFormatError`."""
    if isinstance(name, (ScalarFormat, BlockFormat)):
        return name
    key = name.strip().lower()
    presets = _scalar_presets()
    if key in presets:
        return presets[key]
    blocks = block_presets()
    if key in blocks:
        return blocks[key]
    if m := _INT.match(key):
        return IntFormat(int(m["bits"]), is_signed=not m["u"], narrow=bool(m["narrow"]),
                         fraction_bits=int(m["frac"] or 0))
    if m := _E8M0.match(key):
        return _parse_exponent(m)
    if m := _FLOAT.match(key):
        return _parse_float(m)
    if m := _POW.match(key):
        return power_grid(int(m["bits"]), float(m["p"]))
    if m := _GRID.match(key):
        try:
            levels = tuple(float(v) for v in m["levels"].split(","))
        except ValueError as err:
            raise UnknownFormatError(f"grid levels must be numbers separated by commas: {name!r}") from err
        return GridFormat(levels)
    close = difflib.get_close_matches(key, names(), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownFormatError(
        f"unknown format {name!r}.{hint} Run `mixq formats` for the list; any eXmY minifloat, "
        "intN/uintN, powB_P and grid(l1,l2,...) also parse."
    )
