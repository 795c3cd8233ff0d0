"""A plan: an ordered list of rules ``pattern -> layer spec | keep``; the first matching rule wins.

Patterns match dotted module names: shell globs (``*.mlp.*``, ``model.layers.1?.self_attn.q_proj``)
or regular expressions prefixed with ``re:`` (``re:.*\\.(q|k|v)_proj``), matched against the whole
name. Plans are saved as YAML or JSON with a format version::

    version: 1
    rules:
      - {pattern: lm_head, keep: true}
      - {pattern: "*", weights: int4:g64, algorithm: gptq}

Matching a plan against a model (``mixq.model.plan_match.resolve``) lives in ``mixq.model``; this
module only holds data, so search can build plans without importing a model.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixq.plan.layer_spec import LayerSpec, PlanError

PLAN_VERSION = 1


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether a dotted module ``name`` matches a shell glob or ``re:REGEX`` (the whole name)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class Rule:
    """``pattern -> spec``; ``pattern`` is a glob or ``re:REGEX`` over dotted module names."""

    pattern: str
    spec: LayerSpec

    def __post_init__(self) -> None:
        if not self.pattern:
            raise PlanError("a rule needs a non-empty pattern")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as err:
                raise PlanError(f"rule pattern {self.pattern!r} is not a valid regular expression: {err}") from err

    def matches(self, name: str) -> bool:
        return pattern_matches(self.pattern, name)

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, **self.spec.to_dict()}

    @staticmethod
    def from_dict(d: dict[str, Any], index: int) -> "Rule":
        if not isinstance(d, dict) or "pattern" not in d:
            raise PlanError(f"rule {index}: expected a mapping with a 'pattern' key, got {d!r}")
        body = {k: v for k, v in d.items() if k != "pattern"}
        try:
            return Rule(str(d["pattern"]), LayerSpec.from_dict(body))
        except PlanError as err:
            raise PlanError(f"rule {index} ({d['pattern']!r}): {err}") from err


@dataclass(frozen=True)
class Plan:
    """Ordered rules; modules that no rule matches are kept as they are."""

    rules: tuple[Rule, ...]

    def spec_for(self, name: str) -> tuple[LayerSpec, int | None]:
        """The layer spec of module ``name`` and the index of the rule that gave it (None: no rule)."""
        for i, rule in enumerate(self.rules):
            if rule.matches(name):
                return rule.spec, i
        return LayerSpec.keep(), None

    @staticmethod
    def uniform(spec: LayerSpec, keep: tuple[str, ...] = ("lm_head",), pattern: str = "*") -> "Plan":
        """Every module gets ``spec`` except the ``keep`` patterns (by default the LM head)."""
        return Plan(tuple(Rule(p, LayerSpec.keep()) for p in keep) + (Rule(pattern, spec),))

    # --- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "rules": [r.to_dict() for r in self.rules]}

    @staticmethod
    def from_dict(d: Any) -> "Plan":
        if not isinstance(d, dict) or "rules" not in d:
            raise PlanError("expected a plan: a mapping with 'version' and 'rules'")
        version = d.get("version")
        if version != PLAN_VERSION:
            raise PlanError(f"expected plan version {PLAN_VERSION}, found {version!r}")
        rules = d["rules"]
        if not isinstance(rules, list):
            raise PlanError(f"expected 'rules' to be a list, found {type(rules).__name__}")
        return Plan(tuple(Rule.from_dict(r, i) for i, r in enumerate(rules)))

    def dumps(self, fmt: str = "yaml") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=1) + "\n"
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write YAML (``.yaml``/``.yml``) or JSON (``.json``) atomically."""
        from mixq.fileio import atomic_write_text

        path = Path(path)
        return atomic_write_text(path, self.dumps("json" if path.suffix == ".json" else "yaml"))

    @staticmethod
    def load(path: str | os.PathLike[str]) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"expected a plan file (YAML or JSON), found no file at {path}")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except (ValueError, Exception) as err:  # yaml.YAMLError is not a ValueError
            raise PlanError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
        try:
            return Plan.from_dict(data)
        except PlanError as err:
            raise PlanError(f"{path}: {err}") from err
