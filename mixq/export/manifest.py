"""The manifest of a mixq checkpoint folder (``mixq_manifest.json``): what every stored tensor means.

Layout (JSON; version :data:`FORMAT_VERSION`)::

    {"format": "mixq", "version": 1, "mixq_version": "0.1.0", "source": "HuggingFaceTB/..." | null,
     "plan": {...Plan.to_dict()...}, "meta": {...},
     "tensors": {"model.layers.0.mlp.up_proj.weight":
                    {"spec": "int4:g64", "shape": [1536, 576], "dtype": "float32",
                     "parts": {"codes": {"scheme": "bits4", "bytes": 442368}, "scales": {...}}}},
     "layers": {"model.layers.0.mlp.up_proj":
                    {"weight": "model.layers.0.mlp.up_proj.weight" | null, "inputs": "int8:token" | null,
                     "static": false, "outputs": null, "hadamard": 0, "signs": false}},
     "files": {"model.safetensors": {"sha256": "...", "bytes": 123}, "config.json": {...}, ...}}

A packed part ``P`` of tensor ``T`` is the uint8 safetensors entry ``T.P``; a static input range is
``LAYER.inputs.lo`` / ``LAYER.inputs.hi`` ([in] fp32); stored rotation signs are ``LAYER.signs``.
Every file of the folder but the manifest is listed with its SHA-256, checked before anything is decoded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mixq.export.layers import ExportError, QuantizedLayer
from mixq.export.pack import packed_length, packing_scheme
from mixq.export.tensors import part_formats
from mixq.quant.core import QuantizedTensor
from mixq.quant.spec import QuantSpec

FORMAT_NAME = "mixq"
FORMAT_VERSION = 1
_TOP = {"format": str, "version": int, "mixq_version": str, "plan": dict, "meta": dict, "tensors": dict,
        "layers": dict, "files": dict}
_OPTIONAL_STR = (str, type(None))
_LAYER = {"weight": _OPTIONAL_STR, "inputs": _OPTIONAL_STR, "static": bool, "outputs": _OPTIONAL_STR,
          "hadamard": int, "signs": bool}
_BUFSIZE = 1 << 22


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """The floating-point torch dtype called ``name``; :class:`ExportError` otherwise."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ExportError(f"unknown floating-point dtype {name!r} in the manifest")
    return dtype


def parts_entry(spec: QuantSpec, shape: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """suffix -> {scheme, bytes} of the packed parts of a ``shape`` tensor quantized by ``spec``."""
    return {suffix: {"scheme": packing_scheme(fmt), "bytes": packed_length(n, packing_scheme(fmt))}
            for suffix, (fmt, n) in part_formats(spec, shape).items()}


def tensor_entry(qt: QuantizedTensor) -> dict[str, Any]:
    """The manifest entry of a packed tensor: spec string, shape, dtype, parts."""
    return {"spec": str(qt.spec), "shape": list(qt.shape), "dtype": dtype_name(qt.dtype),
            "parts": parts_entry(qt.spec, qt.shape)}


def layer_entry(layer: QuantizedLayer) -> dict[str, Any]:
    """The manifest entry of a layer (its weight tensor is ``NAME.weight`` when it has codes)."""
    return {"weight": f"{layer.name}.weight" if layer.weight is not None else None,
            "inputs": str(layer.inputs) if layer.inputs is not None else None,
            "static": layer.static_range is not None,
            "outputs": str(layer.outputs) if layer.outputs is not None else None,
            "hadamard": int(layer.hadamard), "signs": layer.signs is not None}


def file_record(path: Path) -> dict[str, Any]:
    """``{"sha256": hex digest, "bytes": size}`` of a file, read in 4 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BUFSIZE):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def file_records(folder: Path, skip: str) -> dict[str, dict[str, Any]]:
    """Records of every file under ``folder`` (relative POSIX names) except ``skip``."""
    return {p.relative_to(folder).as_posix(): file_record(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != skip}


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> Path:
    """Check ``manifest`` against the schema and write it as JSON to ``path``."""
    check_manifest(dict(manifest), path.name)
    path.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path``, checked against the schema; :class:`ExportError` naming the file."""
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not a readable mixq manifest: {err}") from None
    check_manifest(manifest, str(path))
    return manifest


def _expect(value: Any, types: type | tuple[type, ...], where: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = " or ".join(t.__name__ for t in _as_tuple(types))
        raise ExportError(f"{where}: expected {names}, found {type(value).__name__}")


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _spec(text: Any, where: str) -> QuantSpec | None:
    if text is None:
        return None
    try:
        return QuantSpec.parse(text)
    except ValueError as err:
        raise ExportError(f"{where}: bad spec {text!r}: {err}") from None


def check_manifest(manifest: Any, where: str) -> None:
    """Raise :class:`ExportError` (prefixed with ``where``) unless ``manifest`` follows the schema."""
    _expect(manifest, dict, where)
    for key, types in _TOP.items():
        if key not in manifest:
            raise ExportError(f"{where}: the manifest lacks {key!r}")
        _expect(manifest[key], types, f"{where}: {key}")
    if manifest["format"] != FORMAT_NAME:
        raise ExportError(f"{where}: format {manifest['format']!r} is not {FORMAT_NAME!r}")
    if manifest["version"] != FORMAT_VERSION:
        raise ExportError(f"{where}: manifest version {manifest['version']} is not {FORMAT_VERSION} "
                          "(written by another mixq version)")
    for name, entry in manifest["tensors"].items():
        _check_tensor(entry, f"{where}: tensor {name}")
    for name, entry in manifest["layers"].items():
        at = f"{where}: layer {name}"
        _expect(entry, dict, at)
        if set(entry) != set(_LAYER):
            raise ExportError(f"{at}: expected keys {sorted(_LAYER)}, found {sorted(entry)}")
        for key, types in _LAYER.items():
            _expect(entry[key], types, f"{at}: {key}")
        _spec(entry["inputs"], f"{at}: inputs")
        _spec(entry["outputs"], f"{at}: outputs")
        if entry["weight"] is not None and entry["weight"] not in manifest["tensors"]:
            raise ExportError(f"{at}: weight {entry['weight']!r} is not among the manifest's tensors")
        if entry["hadamard"] < 0 or (entry["static"] and entry["inputs"] is None):
            raise ExportError(f"{at}: inconsistent hadamard {entry['hadamard']} / static inputs")
    for name, record in manifest["files"].items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ExportError(f"{where}: file name {name!r} leaves the folder")
        _expect(record, dict, f"{where}: file {name}")
        _expect(record.get("sha256"), str, f"{where}: file {name}: sha256")
        _expect(record.get("bytes"), int, f"{where}: file {name}: bytes")


def _check_tensor(entry: Any, at: str) -> None:
    _expect(entry, dict, at)
    for key, types in {"spec": str, "shape": list, "dtype": str, "parts": dict}.items():
        if key not in entry:
            raise ExportError(f"{at}: lacks {key!r}")
        _expect(entry[key], types, f"{at}: {key}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"]):
        raise ExportError(f"{at}: shape must be non-negative integers, found {entry['shape']}")
    spec = _spec(entry["spec"], at)
    parse_dtype(entry["dtype"])
    try:
        expected = parts_entry(spec, tuple(entry["shape"]))
    except ValueError as err:
        raise ExportError(f"{at}: spec {entry['spec']} does not fit shape {entry['shape']}: {err}") from None
    if entry["parts"] != expected:
        raise ExportError(f"{at}: parts {entry['parts']} differ from those of {entry['spec']}: {expected}")


def verify_files(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Check every listed file's size and SHA-256; :class:`ExportError` naming the first bad file."""
    for name, record in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{path}: missing (listed in the manifest)")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ExportError(f"{path}: {size} bytes, the manifest says {record['bytes']} "
                              "(truncated or replaced)")
        if file_record(path)["sha256"] != record["sha256"]:
            raise ExportError(f"{path}: SHA-256 differs from the manifest (the file is corrupt)")
