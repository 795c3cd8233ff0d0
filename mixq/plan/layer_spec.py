"""What one module gets: a weight quantizer, an input quantizer, a KV-cache quantizer and the algorithm.

A :class:`LayerSpec` is pure data. ``LayerSpec.keep()`` (every field empty) leaves a module untouched.
The dictionary form (the one plans store in YAML/JSON) uses spec strings::

    {"weights": "int4:g64", "inputs": "int8:token", "static_inputs": false, "kv": "fp8_e4m3:token",
     "algorithm": "gptq", "options": {"act_order": true, "hadamard": 32}}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from mixq.quant.spec import QuantSpec, SpecError

ALGORITHMS = ("rtn", "gptq", "awq")


class PlanError(ValueError):
    """A plan or layer spec that cannot be used; the message names the rule or layer and what was expected."""


@dataclass(frozen=True)
class Options:
    """Algorithm options of a layer spec (every field has the default a user would expect).

    ``block_size``, ``damp``, ``act_order``, ``static_groups``: GPTQ. ``awq_grid``, ``awq_clip``: AWQ's
    scale-search grid and clipping search. ``smooth_alpha``: SmoothQuant migration strength (None: off).
    ``hadamard``: online block-diagonal Hadamard on the inputs, block size (0: off; -1: the weight
    spec's block or group size). ``hadamard_seed``: random signs (None: plain Hadamard).
    ``bias_correction``: fold the mean output error into the bias. ``salient``: fraction of output rows
    kept in 16 bits (MixLLM-style).
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    awq_grid: int = 20
    awq_clip: bool = True
    smooth_alpha: float | None = None
    hadamard: int = 0
    hadamard_seed: int | None = None
    bias_correction: bool = False
    salient: float = 0.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise PlanError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 <= self.damp < 1.0:
            raise PlanError(f"damp must be in [0, 1), got {self.damp}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise PlanError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.hadamard < -1 or (self.hadamard > 0 and self.hadamard & (self.hadamard - 1)):
            raise PlanError(f"hadamard must be 0 (off), -1 (the spec's block) or a power of two, got {self.hadamard}")
        if not 0.0 <= self.salient < 1.0:
            raise PlanError(f"salient must be a fraction in [0, 1), got {self.salient}")

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> "Options":
        d = dict(d or {})
        names = {f.name for f in fields(Options)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PlanError(f"unknown option(s) {unknown}; expected some of {sorted(names)}")
        for f in fields(Options):  # types as annotated ("int", "float | None", ...): a file may hold anything
            if f.name in d and not _of_type(d[f.name], str(f.type)):
                raise PlanError(f"option {f.name} must be {f.type}, got {d[f.name]!r}")
        return Options(**d)

    def to_dict(self) -> dict[str, Any]:
        """Only the options that differ from the defaults."""
        default = Options()
        return {k: v for k, v in asdict(self).items() if getattr(default, k) != v}


def _of_type(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits an option annotation ``bool`` | ``int`` | ``float`` (``| None``)."""
    if value is None:
        return "None" in annotation
    base = annotation.split("|")[0].strip()
    if base == "bool":
        return isinstance(value, bool)
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return True


def _spec(value: Any, what: str) -> QuantSpec | None:
    if value is None or isinstance(value, QuantSpec):
        return value
    try:
        return QuantSpec.parse(str(value))
    except (SpecError, ValueError) as err:
        raise PlanError(f"{what}: {err}") from err


@dataclass(frozen=True)
class LayerSpec:
    """Quantizers and algorithm for one module; all-empty means keep the module as it is."""

    weights: QuantSpec | None = None
    inputs: QuantSpec | None = None
    static_inputs: bool = False
    kv: QuantSpec | None = None
    algorithm: str = "rtn"
    options: Options = field(default_factory=Options)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise PlanError(f"unknown algorithm {self.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
        if self.algorithm != "rtn" and self.weights is None:
            raise PlanError(f"algorithm {self.algorithm!r} needs a weight spec")
        if self.static_inputs and self.inputs is None:
            raise PlanError("static_inputs needs an input spec")
        if self.options.hadamard and self.weights is None:
            raise PlanError("an online Hadamard rotation needs a weight spec")
        if self.options.hadamard and (self.algorithm == "awq" or self.options.smooth_alpha is not None):
            raise PlanError("AWQ/SmoothQuant scales cannot be combined with an online Hadamard rotation "
                            "on the same layer (the per-channel scales do not commute with it)")

    @staticmethod
    def keep() -> "LayerSpec":
        return LayerSpec()

    @property
    def is_keep(self) -> bool:
        return self.weights is None and self.inputs is None and self.kv is None

    def with_options(self, **changes: Any) -> "LayerSpec":
        return replace(self, options=replace(self.options, **changes))

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "LayerSpec":
        d = dict(d)
        if d.pop("keep", False):
            if any(d.get(k) is not None for k in ("weights", "inputs", "kv")):
                raise PlanError("a rule cannot both keep a module and give it quantizers")
            return LayerSpec.keep()
        known = {"weights", "inputs", "static_inputs", "kv", "algorithm", "options"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"unknown layer-spec field(s) {unknown}; expected some of {sorted(known)} or keep")
        if not isinstance(d.get("static_inputs", False), bool):
            raise PlanError(f"static_inputs must be true or false, got {d['static_inputs']!r}")
        return LayerSpec(
            weights=_spec(d.get("weights"), "weights"),
            inputs=_spec(d.get("inputs"), "inputs"),
            static_inputs=d.get("static_inputs", False),
            kv=_spec(d.get("kv"), "kv"),
            algorithm=str(d.get("algorithm") or "rtn"),
            options=Options.from_dict(d.get("options")),
        )

    def to_dict(self) -> dict[str, Any]:
        if self.is_keep:
            return {"keep": True}
        out: dict[str, Any] = {}
        for key in ("weights", "inputs", "kv"):
            value = getattr(self, key)
            if value is not None:
                out[key] = str(value)
        if self.static_inputs:
            out["static_inputs"] = True
        if self.weights is not None:
            out["algorithm"] = self.algorithm
        opts = self.options.to_dict()
        if opts:
            out["options"] = opts
        return out

    def describe(self) -> str:
        """One short line: ``int4:g64 gptq, in int8:token``, or ``keep``."""
        if self.is_keep:
            return "keep"
        parts = []
        if self.weights is not None:
            parts.append(f"{self.weights} {self.algorithm}")
        if self.inputs is not None:
            parts.append(f"in {self.inputs}{' static' if self.static_inputs else ''}")
        if self.kv is not None:
            parts.append(f"kv {self.kv}")
        return ", ".join(parts)
