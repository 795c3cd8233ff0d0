"""Reading any mixq output folder into a :class:`Run`: which command wrote it and what it holds.

Kinds, recognised by the files a folder holds (first match wins):

========== ==================================================== ===============================
kind       written by                                           recognised by
========== ==================================================== ===============================
frontier   ``mixq frontier``                                    ``frontier.json``
search     ``mixq search``                                      ``search.json``
profile    ``mixq profile``                                     ``profile.json``
train      ``mixq train``                                       ``summary.json`` + ``curve.csv``
export     ``mixq export`` (mixq format)                        ``mixq_manifest.json``
export     ``mixq export`` / any compressed-tensors checkpoint  ``config.json`` with a compressed-
                                                                tensors ``quantization_config``
quantize   ``mixq quantize``                                    ``mixq.json``
========== ==================================================== ===============================

Reading is plain JSON/CSV/YAML (no model is loaded); safetensors files are read for their header only.
"""

from __future__ import annotations

import csv
import math
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixq.run_info import read_environment

KINDS = ("frontier", "search", "profile", "train", "export", "quantize")
KIND_FILES = {
    "frontier": "frontier.json (mixq frontier)",
    "search": "search.json (mixq search)",
    "profile": "profile.json (mixq profile)",
    "train": "summary.json + curve.csv (mixq train)",
    "export": "mixq_manifest.json or a compressed-tensors config.json (mixq export)",
    "quantize": "mixq.json + plan.yaml (mixq quantize)",
}
EVAL_FILES = ("eval.json", "metrics.json")  # evaluation results stored beside a quantized model


class RunError(ValueError):
    """A path that is not a mixq output folder, or one whose files cannot be read."""


@dataclass
class Run:
    """One output folder as data.

    ``data``: the kind's main JSON document (frontier.json, search.json, profile.json, summary.json,
    the export manifest / mixq.json). ``extra``: what the kind's other files hold (``plans``: label ->
    list of YAML rule dicts; ``curve``: list of CSV rows as dicts; ``tensor_bytes``: tensor name ->
    bytes in the safetensors files; ``plan``: the plan's rule dicts; ``eval``: evaluation results).
    ``environment``: environment.json when the folder has one.
    """

    kind: str
    path: Path
    data: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunError(f"expected readable JSON in {path}, found: {' '.join(str(err).split())}; "
                       f"write the folder again with the mixq command that made it") from None
    if not isinstance(value, dict):
        raise RunError(f"expected a JSON object in {path}, found {type(value).__name__}")
    return value


def _yaml_rules(path: Path) -> list[dict[str, Any]]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise RunError(f"expected a plan YAML in {path}, found: {' '.join(str(err).split())}") from None
    rules = doc.get("rules") if isinstance(doc, dict) else None
    return [r for r in rules if isinstance(r, dict)] if isinstance(rules, list) else []


def _is_compressed_tensors(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        q = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == "compressed-tensors"


def detect_kind(folder: Path) -> str | None:
    """The kind of output folder ``folder`` is (one of :data:`KINDS`), or None."""
    if (folder / "frontier.json").is_file():
        return "frontier"
    if (folder / "search.json").is_file():
        return "search"
    if (folder / "profile.json").is_file():
        return "profile"
    if (folder / "summary.json").is_file() and (folder / "curve.csv").is_file():
        return "train"
    if (folder / "mixq_manifest.json").is_file() or _is_compressed_tensors(folder):
        return "export"
    if (folder / "mixq.json").is_file():
        return "quantize"
    return None


def safetensors_bytes(folder: Path) -> dict[str, int]:
    """Tensor name -> bytes of data, from the headers of every ``*.safetensors`` file in ``folder``."""
    sizes: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error) as err:
            raise RunError(f"expected a safetensors header in {file}, found: {err}") from None
        for name, info in header.items():
            if name != "__metadata__" and isinstance(info, dict):
                start, end = info.get("data_offsets", (0, 0))
                sizes[name] = int(end) - int(start)
    return sizes


def _curve(path: Path) -> list[dict[str, float | None]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items() if k})
    return rows


def _eval(folder: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(meta.get("eval"), dict):
        return meta["eval"]
    for name in EVAL_FILES:
        if (folder / name).is_file():
            return _json(folder / name)
    return None


def _read_frontier(folder: Path) -> Run:
    data = _json(folder / "frontier.json")
    plans = {}
    for point in data.get("points") or []:
        file = folder / str(point.get("plan", ""))
        if point.get("plan") and file.is_file():
            plans[str(point["label"])] = _yaml_rules(file)
    return Run("frontier", folder, data, {"plans": plans})


def _read_search(folder: Path) -> Run:
    return Run("search", folder, _json(folder / "search.json"))


def _read_profile(folder: Path) -> Run:
    return Run("profile", folder, _json(folder / "profile.json"))


def _read_train(folder: Path) -> Run:
    return Run("train", folder, _json(folder / "summary.json"), {"curve": _curve(folder / "curve.csv")})


def _read_export(folder: Path) -> Run:
    if (folder / "mixq_manifest.json").is_file():
        data = _json(folder / "mixq_manifest.json")
    else:
        data = _json(folder / "mixq.json") if (folder / "mixq.json").is_file() else {}
        data.setdefault("format", "compressed-tensors")
        data["quantization_config"] = _json(folder / "config.json").get("quantization_config")
    extra: dict[str, Any] = {"tensor_bytes": safetensors_bytes(folder)}
    if (folder / "plan.yaml").is_file():
        extra["plan"] = _yaml_rules(folder / "plan.yaml")
    return Run("export", folder, data, extra)


def _read_quantize(folder: Path) -> Run:
    data = _json(folder / "mixq.json")
    extra: dict[str, Any] = {"plan": _yaml_rules(folder / "plan.yaml") if (folder / "plan.yaml").is_file() else []}
    evaluation = _eval(folder, data)
    if evaluation is not None:
        extra["eval"] = evaluation
    return Run("quantize", folder, data, extra)


READERS: dict[str, Callable[[Path], Run]] = {
    "frontier": _read_frontier, "search": _read_search, "profile": _read_profile, "train": _read_train,
    "export": _read_export, "quantize": _read_quantize,
}


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read the mixq output folder at ``path`` (or the folder of a file in it, e.g. ``frontier.json``).

    Raises :class:`RunError` when ``path`` does not exist or is not a folder that a mixq command wrote,
    naming the kinds of folders that are understood.
    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.exists():
        raise RunError(f"expected a mixq run folder, found no file or folder at {path}")
    kind = detect_kind(folder)
    if kind is None:
        known = "; ".join(f"{k}: {v}" for k, v in KIND_FILES.items())
        raise RunError(f"{folder} is not a mixq output folder; expected one of {known}")
    run = READERS[kind](folder)
    run.environment = read_environment(folder)
    return run


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, not a number, NaN or infinite)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
