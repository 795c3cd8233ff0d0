"""Sensitivity tables: per layer × candidate degradation scores, as data that can be saved and loaded.

A :class:`SensitivityTable` holds, for every profiled layer (rows) and every candidate (columns), one
score per metric (``weight``, ``fisher``, ``hessian``, ``kl``): the predicted or measured degradation
of the model when only that layer is quantized with that candidate. Larger is worse; ``keep`` scores
0; a candidate that does not fit a layer scores NaN. The table also records the seconds spent on each
pair, so a later search can say what its inputs cost.

This module is pure data: numpy only (no torch import here; the candidate parser is imported lazily).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixq.fileio import atomic_write_text

if TYPE_CHECKING:
    from mixq.plan.candidates import Candidate

PROFILE_VERSION = 1
PROFILE_JSON = "profile.json"
PROFILE_CSV = "profile.csv"


class ProfileError(ValueError):
    """A profile table that is missing, invalid, or made on another model."""


@dataclass(frozen=True)
class LayerInfo:
    """One profiled layer: its dotted name, weight matrix shape ``[out, in]`` and cost facts.

    ``macs``: multiply-accumulates per input row (token or output position) = ``out * in``.
    ``group``: layers with the same non-None group read the same input (q/k/v after one norm,
    gate/up), e.g. ``"model.layers.3.input_layernorm"``.
    """

    name: str
    shape: tuple[int, int]
    macs: int
    group: str | None = None

    @property
    def params(self) -> int:
        return int(self.shape[0]) * int(self.shape[1])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": [int(self.shape[0]), int(self.shape[1])], "macs": int(self.macs),
                "group": self.group}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "LayerInfo":
        shape = d["shape"]
        if not (isinstance(shape, list) and len(shape) == 2):
            raise ProfileError(f"layer {d.get('name')!r}: expected shape [out, in], found {shape!r}")
        return LayerInfo(str(d["name"]), (int(shape[0]), int(shape[1])), int(d["macs"]), d.get("group"))


def model_fingerprint(layers: Sequence[tuple[str, tuple[int, int]]]) -> str:
    """sha256 hex (first 16 characters) of one ``"name:OUTxIN"`` line per layer, in order."""
    text = "\n".join(f"{name}:{int(shape[0])}x{int(shape[1])}" for name, shape in layers)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _number(v: float) -> float | str | None:
    """A float as JSON: NaN -> None (null), +-inf -> "inf" / "-inf" (float() reads them back)."""
    v = float(v)
    if math.isnan(v):
        return None
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _to_nested(a: np.ndarray) -> list:
    """[L, C] float array -> nested lists with NaN as None (JSON null)."""
    return [[_number(v) for v in row] for row in a.tolist()]


def _from_nested(rows: Any, shape: tuple[int, int], what: str) -> np.ndarray:
    try:
        a = np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ProfileError(f"{what}: expected a [{shape[0]}, {shape[1]}] array of numbers/null: {err}") from None
    if a.shape != shape and not (a.size == 0 and math.prod(shape) == 0):
        raise ProfileError(f"{what}: expected shape [{shape[0]}, {shape[1]}], found {list(a.shape)}")
    return a.reshape(shape)


@dataclass
class SensitivityTable:
    """Scores of every (layer, candidate) pair under one or more metrics.

    ``scores[metric]`` and ``seconds[metric]`` are ``[L, C]`` float64 (L = len(layers), C =
    len(candidates)); scores are NaN where a candidate does not apply, 0.0 for ``keep``.
    ``validation``: what :func:`mixq.sensitivity.validate` measured (None before). ``meta``:
    calibration source, samples, length, seed, metric settings, ``kind`` (``lm`` | ``encoder``).
    """

    model: str
    fingerprint: str
    layers: list[LayerInfo]
    candidates: list[str]
    scores: dict[str, np.ndarray]
    seconds: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    validation: dict | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (len(self.layers), len(self.candidates))
        for kind, arrays in (("scores", self.scores), ("seconds", self.seconds)):
            for name, a in arrays.items():
                a = np.asarray(a, dtype=np.float64)
                if a.shape != shape:
                    raise ProfileError(f"{kind}[{name!r}] must be [{shape[0]}, {shape[1]}] (layers x candidates), "
                                       f"found {list(a.shape)}")
                arrays[name] = a

    # --- access ------------------------------------------------------------------------------------
    def candidate_objects(self) -> list["Candidate"]:
        """The candidates parsed back from their names."""
        from mixq.plan.candidates import parse_candidate

        return [parse_candidate(name) for name in self.candidates]

    def metric(self, name: str) -> np.ndarray:
        """Scores ``[L, C]`` of metric ``name``; ProfileError listing the available metrics."""
        if name not in self.scores:
            have = ", ".join(self.scores) or "none"
            raise ProfileError(f"metric {name!r} is not in this profile; available: {have}")
        return self.scores[name]

    def applicable(self) -> np.ndarray:
        """``[L, C]`` bool: the pair has a score (not NaN) in the first metric."""
        shape = (len(self.layers), len(self.candidates))
        if not self.scores:
            return np.ones(shape, dtype=bool)
        return ~np.isnan(next(iter(self.scores.values())))

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    # --- checks --------------------------------------------------------------------------------------
    def check_model(self, fingerprint: str, names: Sequence[str] | Sequence[tuple[str, tuple[int, int]]]) -> None:
        """ProfileError when ``fingerprint`` differs from the table's.

        ``names``: the current model's profiled layer names (or ``(name, shape)`` pairs), used to say
        which layer differs first.
        """
        if fingerprint == self.fingerprint:
            return
        mine = [(layer.name, tuple(layer.shape)) for layer in self.layers]
        theirs = [(n, None) if isinstance(n, str) else (n[0], tuple(n[1])) for n in names]
        where = "the layer lists have the same names and shapes"
        for i in range(max(len(mine), len(theirs))):
            a = mine[i] if i < len(mine) else None
            b = theirs[i] if i < len(theirs) else None
            if a is None or b is None or a[0] != b[0] or (b[1] is not None and a[1] != b[1]):
                where = (f"first differing layer #{i}: profile has {_describe(a)}, model has {_describe(b)}")
                break
        else:
            if all(b[1] is None for b in theirs):
                where = "layer names agree, weight shapes differ"
        raise ProfileError(f"profile was made on {self.model or 'an unnamed model'} ({len(self.layers)} layers); "
                           f"this model ({len(theirs)} layers) differs: {where}")

    # --- files ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (arrays as nested lists, NaN as null, inf as "inf", numpy values as Python)."""
        return _plain({"version": PROFILE_VERSION, "model": self.model, "fingerprint": self.fingerprint,
                "layers": [layer.to_dict() for layer in self.layers], "candidates": list(self.candidates),
                "scores": {k: _to_nested(v) for k, v in self.scores.items()},
                "seconds": {k: _to_nested(v) for k, v in self.seconds.items()},
                "notes": list(self.notes), "validation": self.validation, "meta": self.meta})

    @staticmethod
    def from_dict(d: Any, source: str = "profile") -> "SensitivityTable":
        if not isinstance(d, dict):
            raise ProfileError(f"{source}: expected a JSON object, found {type(d).__name__}")
        version = d.get("version")
        if version != PROFILE_VERSION:
            raise ProfileError(f"{source}: expected profile version {PROFILE_VERSION}, found {version!r}")
        missing = [k for k in ("model", "fingerprint", "layers", "candidates", "scores", "seconds") if k not in d]
        if missing:
            raise ProfileError(f"{source}: missing field(s) {missing}")
        try:
            layers = [LayerInfo.from_dict(x) for x in d["layers"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ProfileError(f"{source}: bad layer entry: {err}") from None
        shape = (len(layers), len(d["candidates"]))
        scores = {k: _from_nested(v, shape, f"{source}: scores[{k!r}]") for k, v in d["scores"].items()}
        seconds = {k: _from_nested(v, shape, f"{source}: seconds[{k!r}]") for k, v in d["seconds"].items()}
        return SensitivityTable(str(d["model"]), str(d["fingerprint"]), layers, [str(c) for c in d["candidates"]],
                                scores, seconds, list(d.get("notes") or []), d.get("validation"),
                                dict(d.get("meta") or {}))

    def csv_text(self) -> str:
        """One row per (layer, candidate): layer, candidate, out, in, bits_per_weight, metrics, metric seconds."""
        cands = self.candidate_objects()
        metrics = list(self.scores)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["layer", "candidate", "out", "in", "bits_per_weight", *metrics, *[f"{m}_s" for m in metrics]])
        for i, layer in enumerate(self.layers):
            for j, cand in enumerate(cands):
                fits = cand.fits(layer.shape) is None
                bpw = cand.weight_bits(layer.shape) / layer.params if fits and layer.params else float("nan")
                vals = [_cell(self.scores[m][i, j]) for m in metrics]
                secs = [_cell(self.seconds[m][i, j]) for m in metrics]
                w.writerow([layer.name, cand.name, layer.shape[0], layer.shape[1], _cell(bpw), *vals, *secs])
        return buf.getvalue()

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/profile.json`` (everything) and ``folder/profile.csv``; returns the JSON path."""
        folder = Path(folder)
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        path = atomic_write_text(folder / PROFILE_JSON, text + "\n")
        atomic_write_text(folder / PROFILE_CSV, self.csv_text())
        return path

    @staticmethod
    def load(path: str | Path) -> "SensitivityTable":
        """A ``profile.json`` file or a folder holding one; ProfileError if missing, invalid or of another version."""
        path = Path(path)
        if path.is_dir():
            path = path / PROFILE_JSON
        if not path.is_file():
            raise ProfileError(f"expected a profile ({PROFILE_JSON} or a folder holding one), found nothing at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ProfileError(f"{path}: not a readable JSON profile: {err}") from None
        return SensitivityTable.from_dict(data, str(path))


def _describe(item: tuple[str, tuple[int, int] | None] | None) -> str:
    if item is None:
        return "nothing"
    name, shape = item
    return name if shape is None else f"{name} {list(shape)}"


def _cell(v: float) -> str:
    return "" if math.isnan(v) else repr(float(v))


def _plain(obj: Any) -> Any:
    """JSON-ready copy of ``obj``: numpy values to Python, NaN to null, inf to "inf", paths to strings."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _number(obj)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise ProfileError(f"cannot store {type(obj).__name__} in a profile")
