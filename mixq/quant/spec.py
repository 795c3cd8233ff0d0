"""``QuantSpec`` = element format x granularity x scale rule x rounding, and its string form.

String grammar: ``FORMAT[:TOKEN]...`` where FORMAT is any name of :func:`mixq.formats.get`
(a block preset such as ``mxfp4`` fills in granularity and scale) and the tokens, in any order, are

============================  =====================================================================
granularity                   ``tensor`` (default), ``channel``, ``channel@1``, ``token``, ``g64``,
                              ``g64@0``, ``b16x16``
symmetry                      ``sym`` (default), ``asym`` (integer elements: min-max + zero point),
                              ``asymf`` (min-max with a float minimum in the scale format, GGUF Q4_1)
clipping                      ``absmax`` (default), ``mse`` (per-group MSE-optimal clip search),
                              ``p99.9`` (percentile of magnitudes)
scale format                  any scalar format name: ``fp32`` (default), ``fp16``, ``bf16``,
                              ``e8m0``, ``fp8_e4m3``, ``ue5m3``, …
scale rule                    ``floor`` (OCP MX, e8m0 default), ``ceil``, ``nearest`` (default)
tensor scale                  ``ts``: a second-level fp32 scale over all groups (as NVFP4)
element rounding              ``rne`` (default), ``sr`` (stochastic), ``rtz`` (toward zero)
============================  =====================================================================

``str(spec)`` writes the canonical string, and ``QuantSpec.parse(str(spec)) == spec``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace

from mixq.formats import (BlockFormat, ExponentFormat, FloatFormat, IntFormat, Rounding, ScalarFormat,
                          block_presets, get, short_name)
from mixq.formats.block import default_scale_rule
from mixq.formats.registry import UnknownFormatError
from mixq.quant.granularity import Granularity, PerBlock, PerChannel, PerGroup, PerTensor, PerToken

FP32 = FloatFormat(8, 23, specials="ieee")
_ROUNDING_TOKENS = {"rne": Rounding.NEAREST, "sr": Rounding.STOCHASTIC, "rtz": Rounding.TOWARD_ZERO}
_ROUNDING_NAMES = {v: k for k, v in _ROUNDING_TOKENS.items()}


class SpecError(ValueError):
    """A quantizer spec that is malformed or inconsistent."""


@dataclass(frozen=True)
class AbsMaxClip:
    """The range is the group's largest magnitude (or min and max, asymmetric)."""

    def token(self) -> str:
        return "absmax"


@dataclass(frozen=True)
class MSEClip:
    """Per group, the clipping ratio of ``linspace(1, min_ratio, steps)`` with the least squared error."""

    steps: int = 32
    min_ratio: float = 0.3

    def __post_init__(self) -> None:
        if self.steps < 2 or not 0 < self.min_ratio < 1:
            raise SpecError(f"mse clipping needs steps >= 2 and 0 < min_ratio < 1, got {self.steps}, {self.min_ratio}")

    def token(self) -> str:
        return "mse" if (self.steps, self.min_ratio) == (32, 0.3) else f"mse{self.steps}_{self.min_ratio:g}"


@dataclass(frozen=True)
class PercentileClip:
    """The range is the ``percent``-th percentile of magnitudes in each group."""

    percent: float

    def __post_init__(self) -> None:
        if not 0 < self.percent <= 100:
            raise SpecError(f"percentile must be in (0, 100], got {self.percent}")

    def token(self) -> str:
        return f"p{self.percent:g}"


Clip = AbsMaxClip | MSEClip | PercentileClip


@dataclass(frozen=True)
class ScaleRule:
    """How each group's scale is chosen and stored.

    ``format`` stores the (block) scale; ``rule`` brings the ideal scale into it (``floor``: OCP MX
    ``2**(floor(log2 amax) - emax_elem)``, power-of-two formats only; ``ceil``: smallest scale that
    does not clip; ``nearest``: round to nearest). Asymmetric ranges use an integer zero point, or
    with ``offset`` a float minimum stored in the scale format (``x = (q - qmin) * s + m``, the GGUF
    Q4_1 layout). ``tensor_scale``, if set, is a second-level
    scale ``amax(x) / (element.max * format.max)`` stored in that format (fp32 for NVFP4).
    """

    asymmetric: bool = False
    offset: bool = False
    clip: Clip = field(default_factory=AbsMaxClip)
    format: ScalarFormat = FP32
    rule: str = ""
    tensor_scale: ScalarFormat | None = None

    def __post_init__(self) -> None:
        if not self.rule:
            object.__setattr__(self, "rule", self.default_rule)
        if self.rule not in ("floor", "ceil", "nearest"):
            raise SpecError(f"scale rule must be floor, ceil or nearest, got {self.rule!r}")
        if self.rule == "floor" and not isinstance(self.format, ExponentFormat):
            raise SpecError(f"the floor (OCP MX) scale rule needs a power-of-two scale format, got {self.format.name}")
        if not isinstance(self.format, (FloatFormat, IntFormat, ExponentFormat)):
            raise SpecError(f"{self.format.name} cannot store scales: use a float, integer or e8m0 format")
        if self.tensor_scale is not None and not isinstance(self.tensor_scale, (FloatFormat, ExponentFormat)):
            raise SpecError(f"a tensor scale is stored as a float or e8m0, got {self.tensor_scale.name}")
        if self.offset and not self.asymmetric:
            raise SpecError("a float offset is a kind of asymmetric range: set asymmetric too ('asymf')")
        if self.offset and not self.format.signed:
            raise SpecError(f"a float offset (asymf) is stored in the scale format, which must be signed; got {self.format.name}")
        if self.asymmetric and self.rule == "floor":
            raise SpecError("asymmetric ranges need a scale rule other than floor (use :nearest or :ceil)")

    @property
    def default_rule(self) -> str:
        return default_scale_rule(self.format)


@dataclass(frozen=True)
class QuantSpec:
    """A quantizer: four independent choices, validated at construction."""

    format: ScalarFormat
    granularity: Granularity = field(default_factory=PerTensor)
    scale: ScaleRule = field(default_factory=ScaleRule)
    rounding: Rounding = Rounding.NEAREST

    def __post_init__(self) -> None:
        if isinstance(self.format, BlockFormat):
            raise SpecError("use QuantSpec.from_format for block formats")
        if isinstance(self.format, ExponentFormat):
            raise SpecError(f"{self.format.name} is a scale format; it cannot hold elements")
        if self.scale.asymmetric and not isinstance(self.format, IntFormat):
            raise SpecError(f"asymmetric (zero-point) quantization needs an integer element, got {self.format.name}")
        if self.scale.asymmetric and self.format.fraction_bits:
            raise SpecError(f"asymmetric ranges need a plain integer element, not fixed point {self.format.name}")
        if self.rounding not in Rounding.__members__.values():
            raise SpecError(f"unknown rounding {self.rounding!r}")

    # --- construction ------------------------------------------------------------------------
    @staticmethod
    def from_format(fmt: ScalarFormat | BlockFormat | str) -> "QuantSpec":
        """The natural quantizer of a format: per tensor, or the block format's own layout."""
        fmt = get(fmt) if isinstance(fmt, str) else fmt
        if not isinstance(fmt, BlockFormat):
            return QuantSpec(fmt)
        gran: Granularity = PerGroup(fmt.block[0]) if len(fmt.block) == 1 else PerBlock(*fmt.block)
        return QuantSpec(fmt.element, gran, ScaleRule(format=fmt.scale, rule=fmt.scale_rule,
                                                      tensor_scale=fmt.tensor_scale))

    @staticmethod
    def parse(text: str) -> "QuantSpec":
        """Parse the string form (see the module docstring); errors name the bad token."""
        if isinstance(text, QuantSpec):
            return text
        parts = [p.strip() for p in str(text).strip().split(":")]
        if not parts[0]:
            raise SpecError(f"empty spec {text!r}; expected e.g. 'int4:g64' or 'mxfp4'")
        base = QuantSpec.from_format(parts[0])
        fields: dict = {"granularity": base.granularity, "rounding": base.rounding}
        rule = {"asymmetric": False, "offset": False, "clip": base.scale.clip, "format": base.scale.format,
                "rule": "",
                "tensor_scale": base.scale.tensor_scale}
        for tok in parts[1:]:
            _apply_token(tok.lower(), text, fields, rule)
        return QuantSpec(base.format, fields["granularity"], ScaleRule(**rule), fields["rounding"])

    # --- string form -------------------------------------------------------------------------
    def __str__(self) -> str:
        for name, fmt in block_presets().items():
            preset = QuantSpec.from_format(fmt)
            if replace(self, rounding=Rounding.NEAREST, scale=replace(self.scale, clip=AbsMaxClip())) == preset:
                extra = [] if isinstance(self.scale.clip, AbsMaxClip) else [self.scale.clip.token()]
                if self.rounding is not Rounding.NEAREST:
                    extra.append(_ROUNDING_NAMES[self.rounding])
                return ":".join([name, *extra])
        s = self.scale
        toks = [short_name(self.format)]
        if not isinstance(self.granularity, PerTensor):
            toks.append(self.granularity.token())
        if s.asymmetric:
            toks.append("asymf" if s.offset else "asym")
        if not isinstance(s.clip, AbsMaxClip):
            toks.append(s.clip.token())
        if s.format != FP32:
            toks.append(short_name(s.format))
        if s.rule != s.default_rule:
            toks.append(s.rule)
        if s.tensor_scale is not None:
            toks.append("ts" if s.tensor_scale == FP32 else f"ts={short_name(s.tensor_scale)}")
        if self.rounding is not Rounding.NEAREST:
            toks.append(_ROUNDING_NAMES[self.rounding])
        return ":".join(toks)

    def __repr__(self) -> str:
        return f"QuantSpec({str(self)!r})"


_GROUP = re.compile(r"^g(\d+)(?:@(-?\d+))?$")
_CHANNEL = re.compile(r"^channel(?:@(-?\d+))?$")
_BLOCK = re.compile(r"^b(\d+)x(\d+)$")
_MSE = re.compile(r"^mse(?:(\d+)_([0-9.]+))?$")
_PCT = re.compile(r"^p(\d+(?:\.\d+)?)$")
_KNOWN = ["tensor", "channel", "token", "g64", "b16x16", "sym", "asym", "asymf", "absmax", "mse", "p99.9",
          "floor", "ceil", "nearest", "ts", "rne", "sr", "rtz", "e8m0", "fp16", "bf16", "fp8_e4m3"]


def _apply_token(tok: str, text: str, fields: dict, rule: dict) -> None:
    """Update the parse state with one token (mutates ``fields`` and ``rule``)."""
    if tok == "tensor":
        fields["granularity"] = PerTensor()
    elif tok == "token":
        fields["granularity"] = PerToken()
    elif m := _CHANNEL.match(tok):
        fields["granularity"] = PerChannel(int(m[1]) if m[1] else 0)
    elif m := _GROUP.match(tok):
        fields["granularity"] = _granularity(PerGroup, tok, text, int(m[1]), int(m[2]) if m[2] else -1)
    elif m := _BLOCK.match(tok):
        fields["granularity"] = _granularity(PerBlock, tok, text, int(m[1]), int(m[2]))
    elif tok in ("sym", "asym", "asymf"):
        rule["asymmetric"], rule["offset"] = tok != "sym", tok == "asymf"
    elif tok == "absmax":
        rule["clip"] = AbsMaxClip()
    elif m := _MSE.match(tok):
        rule["clip"] = MSEClip(int(m[1]), float(m[2])) if m[1] else MSEClip()
    elif m := _PCT.match(tok):
        rule["clip"] = PercentileClip(float(m[1]))
    elif tok in ("floor", "ceil", "nearest"):
        rule["rule"] = tok
    elif tok == "ts" or tok.startswith("ts="):
        rule["tensor_scale"] = FP32 if tok == "ts" else _scalar(tok[3:], text)
    elif tok in _ROUNDING_TOKENS:
        fields["rounding"] = _ROUNDING_TOKENS[tok]
    else:
        try:
            rule["format"] = _scalar(tok, text)
        except UnknownFormatError:
            close = difflib.get_close_matches(tok, _KNOWN, n=4, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise SpecError(f"unknown token {tok!r} in spec {text!r}.{hint} Expected a granularity "
                            "(tensor, channel, token, g64, b16x16), sym/asym, absmax/mse/p99.9, a scale "
                            "format (e8m0, fp16, ...), floor/ceil/nearest, ts, or rne/sr/rtz") from None


def _granularity(cls: type, tok: str, text: str, *args: int) -> Granularity:
    try:
        return cls(*args)
    except ValueError as err:  # g0, b0x4: report as a spec error naming the token
        raise SpecError(f"bad granularity {tok!r} in spec {text!r}: {err}") from None


def _scalar(name: str, text: str) -> ScalarFormat:
    fmt = get(name)
    if isinstance(fmt, BlockFormat):
        raise SpecError(f"{name!r} in {text!r} is a block format; a scale format must be scalar")
    return fmt
