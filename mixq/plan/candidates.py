"""Search candidates: the named layer specs a mixed-precision search chooses among, per layer.

A candidate is a weight spec, optionally with an input spec after ``@``, or ``keep`` (the layer stays
in 16 bits)::

    int4:g64:mse          weight-only, 4-bit integers in groups of 64 with MSE-searched scales
    int8:channel@int8:token   W8A8: per-channel weights, dynamic per-token inputs
    keep                  16-bit weights

A list is comma-separated (spec strings themselves never hold a comma). Candidates are pure data: the
algorithm that later applies a chosen plan (RTN, GPTQ, AWQ) is set when the plan is built.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from mixq.plan.layer_spec import LayerSpec, PlanError
from mixq.quant.spec import QuantSpec, SpecError

KEEP = "keep"
KEEP_BITS = 16.0
"""Bits per weight (and per activation) of a layer that is kept: bf16/fp16 storage."""

DEFAULT_CANDIDATES = ("int2:g64:mse,int3:g128:mse,int3:g64:mse,int4:g128:mse,int4:g64:mse,mxfp4,nvfp4,"
                      "int5:g64:mse,mxfp6_e2m3,int8:channel,fp8_e4m3:channel,keep")
"""Integers in groups of 64 and 128 (MSE-searched scales), MX and NVFP4, 6-bit MX floats, 8-bit integer and
float per channel, and 16-bit: 2.5 to 16 bits per weight, every scale counted. Group-128 candidates do not
fit layers whose inputs are not a multiple of 128 (e.g. SmolLM2's 576): they are left out there."""


@dataclass(frozen=True)
class Candidate:
    """One choice for a layer: a name (the string it was parsed from) and its layer spec.

    ``spec.weights`` None and ``spec.inputs`` None is ``keep``. ``spec.algorithm`` is ``rtn``.
    """

    name: str
    spec: LayerSpec

    @property
    def is_keep(self) -> bool:
        return self.spec.is_keep

    @property
    def family(self) -> str:
        """``int`` | ``float`` | ``keep``: integer-valued elements (int, uint, ternary, MXINT, NVINT)
        or floating-point elements (minifloats, MXFP, NVFP4, lookup grids such as NF4)."""
        if self.spec.weights is None:
            return KEEP
        return "int" if _integer_elements(self.spec.weights) else "float"

    def weight_bits(self, shape: tuple[int, int]) -> float:
        """Total bits of a ``[out, in]`` weight under this candidate, every scale counted; keep: 16 per weight."""
        from mixq.quant.accounting import bit_count

        if self.spec.weights is None:
            return KEEP_BITS * math.prod(shape)
        return bit_count(self.spec.weights, tuple(shape)).total

    @property
    def activation_bits(self) -> float:
        """Bits per input value: the input spec's element bits, or 16 when inputs are not quantized."""
        return float(self.spec.inputs.format.bits) if self.spec.inputs is not None else KEEP_BITS

    def fits(self, shape: tuple[int, int]) -> str | None:
        """None when the candidate applies to a ``[out, in]`` weight, else why not (one line)."""
        from mixq.quant.granularity import GroupSizeError, Grouping

        try:
            if self.spec.weights is not None:
                Grouping(tuple(shape), self.spec.weights.granularity)
            if self.spec.inputs is not None:
                Grouping((1, shape[1]), self.spec.inputs.granularity)
        except GroupSizeError as err:
            return f"{self.name} does not fit weight {list(shape)}: {err}"
        return None


def _integer_elements(spec: QuantSpec) -> bool:
    """Whether the element grid is integer-valued (int, uint, ternary, binary, MXINT) rather than float."""
    from mixq.formats.grid import GridFormat
    from mixq.formats.integer import IntFormat

    fmt = spec.format
    element = getattr(fmt, "element", fmt)  # a block format's element format
    if isinstance(element, GridFormat):
        return all(float(v).is_integer() for v in element.levels)
    return isinstance(element, IntFormat)


def parse_candidate(text: str) -> Candidate:
    """``keep`` | ``WEIGHT_SPEC`` | ``WEIGHT_SPEC@INPUT_SPEC``; PlanError naming the bad part."""
    name = text.strip()
    if not name:
        raise PlanError("expected a candidate (a weight spec, WEIGHT@INPUT or keep), found an empty string")
    if name.lower() == KEEP:
        return Candidate(KEEP, LayerSpec.keep())
    weights, _, inputs = name.partition("@")
    try:
        w = QuantSpec.parse(weights.strip())
        a = QuantSpec.parse(inputs.strip()) if inputs.strip() else None
    except SpecError as err:
        raise PlanError(f"candidate {name!r}: {err}") from err
    if "@" in name and a is None:
        raise PlanError(f"candidate {name!r}: expected an input spec after '@'")
    return Candidate(name, LayerSpec(weights=w, inputs=a))


def parse_candidates(text: str | Sequence[str]) -> list[Candidate]:
    """A comma-separated string (or a list of strings) of candidates; at least one, no duplicates."""
    items = [t for t in (text.split(",") if isinstance(text, str) else text)]
    if not [t for t in items if t.strip()]:
        raise PlanError("expected at least one candidate (e.g. int4:g64,int8:channel,keep), found none")
    out = [parse_candidate(t) for t in items if t.strip()]
    seen: dict[str, int] = {}
    for c in out:
        key = c.spec.describe()
        if key in seen:
            raise PlanError(f"candidate {c.name!r} repeats candidate {out[seen[key]].name!r}")
        seen[key] = out.index(c)
    return out


def candidate_named(candidates: Sequence[Candidate], name: str) -> Candidate:
    """The candidate called ``name``; PlanError naming the close matches."""
    for c in candidates:
        if c.name == name:
            return c
    names = [c.name for c in candidates]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    hint = f"; close: {', '.join(close)}" if close else f"; candidates: {', '.join(names)}"
    raise PlanError(f"unknown candidate {name!r}{hint}")
