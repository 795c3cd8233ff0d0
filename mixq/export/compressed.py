"""compressed-tensors checkpoints: written where the scheme is expressible, read back by mixq exactly.

A folder holds ``config.json`` with a ``quantization_config`` (``quant_method: compressed-tensors``, one
config group per distinct scheme targeting exact module names, a format per group and
``mixed-precision`` globally when they differ), ``model.safetensors`` with the compressed tensors
(names as compressed-tensors gives them, see :mod:`mixq.export.ct_schemes`), the tokenizer, and mixq's
sidecars: ``plan.yaml``, ``mixq.json`` (per-layer mixq specs, and the size and SHA-256 of every other
file, verified before mixq decodes anything) and ``mixq_extra.safetensors`` (what
compressed-tensors does not keep exactly: static input ranges, tensor scales and their block scales).
transformers loads the folder with ``AutoModelForCausalLM.from_pretrained``; :func:`read_compressed_tensors`
rebuilds mixq's fake-quant model from the same files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

import mixq
from mixq.export.ct_schemes import PARAM_NAMES, ct_scheme, decode_layer, encode_layer
from mixq.export.layers import Exported, ExportError, QuantizedLayer, fill, float_tensors, skeleton
from mixq.export.manifest import file_records, verify_files
from mixq.fileio import atomic_folder
from mixq.run_info import write_environment
from mixq.model.plan_match import ResolvedPlan, resolve
from mixq.model.run_folder import check_target
from mixq.plan import Plan
from mixq.quant import QuantSpec

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SIDECAR = "mixq.json"
EXTRA = "mixq_extra.safetensors"
PLAN = "plan.yaml"
FORMAT = "compressed-tensors"


class UnsupportedSchemeError(ExportError):
    """Layers compressed-tensors cannot express; ``reasons`` maps each layer name to why."""

    def __init__(self, reasons: Mapping[str, str]) -> None:
        self.reasons = dict(reasons)
        lines = "\n".join(f"  {name}: {why}" for name, why in self.reasons.items())
        super().__init__(f"{len(self.reasons)} layer(s) cannot be written as compressed-tensors "
                         f"(use mixq's own format for them):\n{lines}")


def schemes_of(layers: Mapping[str, QuantizedLayer], resolved: ResolvedPlan) -> dict[str, dict[str, Any]]:
    """The scheme of every layer; raises :class:`UnsupportedSchemeError` listing all that have none."""
    reasons: dict[str, str] = {}
    for row in resolved.layers:
        if row.kind == "attention" and row.spec.kv is not None:
            reasons[row.name] = f"KV-cache quantization ({row.spec.kv}) is not written to compressed-tensors"
    schemes: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        s = ct_scheme(layer)
        if isinstance(s, str):
            reasons[name] = s
        else:
            schemes[name] = s
    if reasons:
        raise UnsupportedSchemeError(reasons)
    return schemes


def quantization_config(schemes: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``: one group per distinct scheme, exact-name targets."""
    groups: dict[str, dict[str, Any]] = {}
    for name, s in schemes.items():
        key = json.dumps([s["weights"], s["input_activations"], s["format"]], sort_keys=True)
        group = groups.setdefault(key, {"targets": [], "weights": s["weights"],
                                        "input_activations": s["input_activations"],
                                        "output_activations": None, "format": s["format"]})
        group["targets"].append(name)
    formats = sorted({s["format"] for s in schemes.values()})
    return {
        "quant_method": "compressed-tensors",
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": [],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": _ct_version(),
    }


def _ct_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # noqa: BLE001  (the package is optional for writing)
        return None


def _extra_tensors(layers: Mapping[str, QuantizedLayer]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, layer in layers.items():
        if layer.static_range is not None:
            out[f"{name}.static_lo"] = layer.static_range[0].float().contiguous()
            out[f"{name}.static_hi"] = layer.static_range[1].float().contiguous()
        qt = layer.weight
        if qt is not None and qt.tensor_scale is not None:
            out[f"{name}.tensor_scale"] = qt.tensor_scale.float().reshape(()).contiguous()
            out[f"{name}.block_scale"] = qt.scales.float().contiguous()
    return out


def save_compressed_tensors(model: nn.Module, layers: Mapping[str, QuantizedLayer], resolved: ResolvedPlan,
                            out: str | os.PathLike[str], *, tokenizer: Any = None,
                            source: str | os.PathLike[str] | None = None, meta: dict[str, Any] | None = None,
                            overwrite: bool = False) -> Path:
    """Write ``model`` (fake-quantized; ``layers`` from :func:`quantized_layers`) as compressed-tensors.

    Every layer is checked first: :class:`UnsupportedSchemeError` (listing each layer and why) is
    raised before anything is written. Then ``out`` is checked (``OutputExistsError`` without
    ``overwrite``, never over ``source``) and written atomically. Returns ``out``.
    """
    from safetensors.torch import save_file

    schemes = schemes_of(layers, resolved)
    out = Path(out)
    source_dir = Path(source) if source is not None and Path(source).is_dir() else None
    check_target(out, source_dir, overwrite)
    tensors = float_tensors(model, layers)
    for name, layer in layers.items():
        for key, value in encode_layer(layer, schemes[name]).items():
            tensors[f"{name}.{key}"] = value
    extra = _extra_tensors(layers)
    sidecar = {
        "format": FORMAT, "mixq_version": mixq.__version__, "source": None if source is None else str(source),
        "layers": {name: {"weights": None if l.weight is None else str(l.weight.spec),
                          "inputs": None if l.inputs is None else str(l.inputs),
                          "static": l.static_range is not None, "format": schemes[name]["format"],
                          "exact_in_transformers": schemes[name]["exact"]}
                   for name, l in layers.items()},
        **(meta or {}),
    }
    with atomic_folder(out) as tmp:
        write_environment(tmp)
        config = model.config.to_dict()
        config.pop("torch_dtype", None)
        config["architectures"] = config.get("architectures") or [type(model).__name__]
        config["dtype"] = "float32"  # scales are fp32: loading in bf16 would round them
        config["quantization_config"] = quantization_config(schemes)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if extra:
            save_file(extra, str(tmp / EXTRA))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        resolved.plan.save(tmp / PLAN)
        sidecar["files"] = file_records(tmp, skip=SIDECAR)  # checked by read_compressed_tensors
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1, default=str) + "\n")
    return out


def is_compressed_tensors_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a ``config.json`` whose quantization method is compressed-tensors."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path.parent} lacks {path.name}: it was not written by mixq (load it with transformers)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON: {err}") from None


def read_compressed_tensors(path: str | os.PathLike[str]) -> Exported:
    """mixq's reader of a folder written by :func:`save_compressed_tensors`: the fake-quant model
    (equal to the exported one bit for bit), its layers' codes, the resolved plan and ``mixq.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not is_compressed_tensors_folder(path):
        raise ExportError(f"{path} is not a compressed-tensors folder (no config.json with that quant_method)")
    meta = _read_json(path / SIDECAR)
    if not isinstance(meta.get("files"), dict):
        raise ExportError(f"{path / SIDECAR} lists no files and checksums: it was not written by this mixq")
    verify_files(path, meta)  # sizes and SHA-256 before anything is decoded
    config = _read_json(path / CONFIG)
    try:
        tensors = load_file(str(path / WEIGHTS))
        extra = load_file(str(path / EXTRA)) if (path / EXTRA).is_file() else {}
    except (SafetensorError, OSError) as err:
        raise ExportError(f"cannot read the tensors of {path}: {err}") from None
    groups = config["quantization_config"].get("config_groups", {})
    scheme_of = {t: g for g in groups.values() for t in g.get("targets", [])}
    layers: dict[str, QuantizedLayer] = {}
    for name, info in meta.get("layers", {}).items():
        parts = {k: tensors.pop(f"{name}.{k}") for k in PARAM_NAMES if f"{name}.{k}" in tensors}
        mine = {k.rsplit(".", 1)[1]: v for k, v in extra.items() if k.rsplit(".", 1)[0] == name}
        weight = None
        if info.get("weights") is not None:
            if name not in scheme_of:
                raise ExportError(f"layer {name} is in {SIDECAR} but in no config group of {CONFIG}")
            weight = decode_layer(name, parts, QuantSpec.parse(info["weights"]), scheme_of[name], mine)
        static = (mine["static_lo"], mine["static_hi"]) if info.get("static") else None
        inputs = QuantSpec.parse(info["inputs"]) if info.get("inputs") else None
        layers[name] = QuantizedLayer(name, weight, inputs, static)
    model = skeleton(path)
    resolved = resolve(Plan.load(path / PLAN), model)
    model = fill(model, tensors, layers, resolved)
    return Exported(model=model, layers=layers, resolved=resolved, meta=meta)
