"""From a search to data: tie groups and pins from patterns, constraint files, plans and allocation rows."""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixq.plan.candidates import Candidate, candidate_named
from mixq.plan.layer_spec import LayerSpec, Options, PlanError
from mixq.plan.plan import Plan, Rule
from mixq.search.costs import COST_KINDS, LatencyTable
from mixq.search.errors import SearchError

if TYPE_CHECKING:
    from mixq.sensitivity.table import LayerInfo

_GLOB_CHARS = re.compile(r"[*?\[\]]")


def tie_groups(layers: Sequence[LayerInfo]) -> list[list[int]]:
    """Indices of layers sharing a non-None ``group`` (groups of two or more), in order of first layer."""
    by_group: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        if layer.group is not None:
            by_group.setdefault(layer.group, []).append(i)
    return [idx for idx in by_group.values() if len(idx) > 1]


def _matching(layers: Sequence[LayerInfo], pattern: str) -> list[int]:
    """Indices of the layers a glob (or ``re:REGEX``) pattern matches; SearchError (close names) if none."""
    try:
        rule = Rule(pattern, LayerSpec.keep())
    except PlanError as err:
        raise SearchError(str(err)) from err
    hits = [i for i, layer in enumerate(layers) if rule.matches(layer.name)]
    if not hits:
        names = [layer.name for layer in layers]
        close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise SearchError(f"pattern {pattern!r} matches no layer of the profile ({_describe(names)}){hint}")
    return hits


def _describe(names: Sequence[str]) -> str:
    """``210 layers in 30 blocks: first … last`` (blocks = distinct prefixes up to the first index)."""
    if not names:
        return "no layers"
    blocks = {m.group(0) for n in names if (m := re.match(r"^(.*?\.\d+)(?=\.)", n))}
    inside = f" in {len(blocks)} blocks" if blocks else ""
    if len(names) == 1:
        return f"1 layer: {names[0]}"
    return f"{len(names)} layers{inside}: {names[0]} … {names[-1]}"


def pins_from_patterns(layers: Sequence[LayerInfo], candidates: Sequence[Candidate],
                       pins: Mapping[str, str]) -> dict[int, int]:
    """``{pattern: candidate name}`` → ``{layer index: candidate index}``; the first pattern that matches a
    layer wins. SearchError when a pattern matches no layer, a candidate is unknown or does not fit."""
    out: dict[int, int] = {}
    for pattern, name in pins.items():
        try:
            cand = candidate_named(candidates, str(name))
        except PlanError as err:
            raise SearchError(f"pin {pattern}={name}: {err}") from err
        j = list(candidates).index(cand)
        for i in _matching(layers, str(pattern)):
            if i in out:  # an earlier pattern pinned it
                continue
            reason = cand.fits(tuple(layers[i].shape))
            if reason is not None:
                raise SearchError(f"pin {pattern}={name}: layer {layers[i].name}: {reason}")
            out[i] = j
    return out


def _layer_pattern(name: str) -> str:
    """A pattern matching exactly ``name``: the name, or ``re:`` + the escaped name when it has glob chars."""
    return f"re:{re.escape(name)}" if _GLOB_CHARS.search(name) or name.startswith("re:") else name


def plan_from_choice(layers: Sequence[LayerInfo], candidates: Sequence[Candidate], choice: np.ndarray, *,
                     algorithm: str = "rtn", keep: Sequence[str] = ("lm_head",),
                     options: Options | None = None) -> Plan:
    """A plan: ``keep`` patterns first, then one exact-name rule per profiled layer with its chosen candidate.

    Weight candidates get ``algorithm`` (and ``options`` when given); input-only candidates stay RTN; keep
    stays keep. Layers a keep pattern already matches get no rule of their own.
    """
    choice = np.asarray(choice)
    if choice.shape != (len(layers),):
        raise SearchError(f"expected a choice of {len(layers)} candidate indices, found shape "
                          f"{list(choice.shape)}")
    keep_rules = [Rule(p, LayerSpec.keep()) for p in keep]
    rules = list(keep_rules)
    for layer, j in zip(layers, choice):
        if any(r.matches(layer.name) for r in keep_rules):
            continue
        if not 0 <= int(j) < len(candidates):
            raise SearchError(f"layer {layer.name}: candidate index {int(j)} out of range "
                              f"(0..{len(candidates) - 1})")
        spec = candidates[int(j)].spec
        if spec.weights is not None:
            try:
                spec = replace(spec, algorithm=algorithm, options=options or spec.options)
            except PlanError as err:
                raise SearchError(f"layer {layer.name}: {err}") from err
        rules.append(Rule(_layer_pattern(layer.name), spec))
    return Plan(tuple(rules))


def allocation_rows(layers: Sequence[LayerInfo], candidates: Sequence[Candidate], choice: np.ndarray
                    ) -> list[dict[str, Any]]:
    """One row per layer: name, out, in, candidate, family, bits_per_weight, bits (every scale counted)."""
    rows = []
    for layer, j in zip(layers, np.asarray(choice)):
        cand = candidates[int(j)]
        shape = (int(layer.shape[0]), int(layer.shape[1]))
        bits = float(cand.weight_bits(shape))
        rows.append({"name": layer.name, "out": shape[0], "in": shape[1], "candidate": cand.name,
                     "family": cand.family, "bits_per_weight": bits / math.prod(shape), "bits": bits})
    return rows


def load_constraints(path: str | os.PathLike[str], layers: Sequence[LayerInfo],
                     candidates: Sequence[Candidate]) -> dict[str, Any]:
    """Read a YAML/JSON constraint file and resolve it against the profile.

    File: ``{budget: {bits: 4.25, bytes: 2e9, latency: 0.05, bops: 1e12}, pin: {pattern: candidate},
    tie: [[pattern, ...], ...], latency_table: CSV}`` (all keys optional; ``bits`` is per weight, the other
    budgets are totals; ``latency_table`` relative to the file). Returns ``{"budget": {kind: float},
    "pin": {layer index: candidate index}, "tie": [[layer index, ...]],
    "latency_table": LatencyTable | None}``.
    """
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"expected a constraint file (YAML or JSON), found no file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # yaml.YAMLError is not a ValueError
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise SearchError(f"constraint file {path}: not valid {kind}: {err}") from err
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise SearchError(f"constraint file {path}: expected a mapping with budget/pin/tie/latency_table, "
                          f"found {type(data).__name__}")
    unknown = sorted(set(data) - {"budget", "pin", "tie", "latency_table"})
    if unknown:
        raise SearchError(f"constraint file {path}: unknown key(s) {unknown}; "
                          "expected budget, pin, tie, latency_table")
    try:
        return {"budget": _budget(data.get("budget") or {}),
                "pin": _pins(data.get("pin") or {}, layers, candidates),
                "tie": _ties(data.get("tie") or [], layers),
                "latency_table": _latency(data.get("latency_table"), path)}
    except SearchError as err:
        raise SearchError(f"constraint file {path}: {err}") from err


def _budget(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise SearchError(f"budget: expected a mapping kind -> limit, found {raw!r}")
    out = {}
    for kind, value in raw.items():
        if kind not in COST_KINDS:
            raise SearchError(f"budget: unknown kind {kind!r}; expected some of {', '.join(COST_KINDS)}")
        number = _number(value)
        if number is None or not math.isfinite(number) or number <= 0:
            raise SearchError(f"budget {kind}: expected a positive number, found {value!r}")
        out[str(kind)] = number
    return out


def _number(value: Any) -> float | None:
    """A number, or a numeric string (YAML 1.1 reads ``1e12`` without a dot as a string); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _pins(raw: Any, layers: Sequence[LayerInfo], candidates: Sequence[Candidate]) -> dict[int, int]:
    if not isinstance(raw, dict):
        raise SearchError(f"pin: expected a mapping pattern -> candidate, found {raw!r}")
    return pins_from_patterns(layers, candidates, {str(k): str(v) for k, v in raw.items()})


def _ties(raw: Any, layers: Sequence[LayerInfo]) -> list[list[int]]:
    if not isinstance(raw, list) or not all(isinstance(g, list) and g for g in raw):
        raise SearchError(f"tie: expected a list of non-empty lists of patterns, found {raw!r}")
    return [sorted({i for pattern in group for i in _matching(layers, str(pattern))}) for group in raw]


def _latency(raw: Any, source: Path) -> LatencyTable | None:
    if raw is None:
        return None
    table = Path(str(raw))
    return LatencyTable.load(table if table.is_absolute() else source.parent / table)
