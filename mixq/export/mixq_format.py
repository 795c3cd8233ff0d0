"""mixq's own checkpoint: any plan, packed at its accounting width, with a self-describing manifest.

Folder layout::

    OUT/config.json, tokenizer files   the Hugging Face config (and tokenizer) of the model
    OUT/model.safetensors              float tensors (by unwrapped state-dict name), packed parts
                                       ``LAYER.weight.{codes,scales,zeros,offsets,tensor_scale}`` (uint8),
                                       static input ranges ``LAYER.inputs.{lo,hi}``, rotation signs
                                       ``LAYER.signs``
    OUT/plan.yaml                      the plan (also inside the manifest)
    OUT/mixq_manifest.json             see :mod:`mixq.export.manifest`; written last

The folder is built next to ``OUT`` and renamed into place. :func:`read_mixq` checks every file's
SHA-256 before decoding and rebuilds exactly the fake-quant model that was saved.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

import mixq
from mixq.export.layers import Exported, ExportError, QuantizedLayer, fill, float_tensors, skeleton
from mixq.export.manifest import (FORMAT_NAME, FORMAT_VERSION, file_records, layer_entry, parse_dtype,
                                  read_manifest, tensor_entry, verify_files, write_manifest)
from mixq.export.tensors import decode_tensor, encode_tensor
from mixq.fileio import atomic_folder
from mixq.run_info import write_environment
from mixq.model.plan_match import ResolvedPlan, resolve
from mixq.model.run_folder import PLAN, check_target
from mixq.plan import Plan, PlanError
from mixq.quant.spec import QuantSpec

MANIFEST = "mixq_manifest.json"
WEIGHTS = "model.safetensors"


def is_mixq_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a mixq manifest."""
    return (Path(path) / MANIFEST).is_file()


def _stored_tensors(layers: Mapping[str, QuantizedLayer]) -> dict[str, Tensor]:
    """The layers' packed parts, static ranges and signs, by safetensors name."""
    out: dict[str, Tensor] = {}
    for name, layer in layers.items():
        if layer.weight is not None:
            for suffix, data in encode_tensor(layer.weight).items():
                out[f"{name}.weight.{suffix}"] = data
        if layer.static_range is not None:
            lo, hi = layer.static_range
            out[f"{name}.inputs.lo"] = lo.detach().float().contiguous()
            out[f"{name}.inputs.hi"] = hi.detach().float().contiguous()
        if layer.signs is not None:
            out[f"{name}.signs"] = layer.signs.detach().float().contiguous()
    return out


def _config(model: nn.Module) -> Any:
    """A copy of the model's config naming its class in ``architectures`` (as ``save_pretrained`` does),
    so that the reader builds the same class; the model's own config is left as it is."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    return config


def save_mixq(model: nn.Module, layers: Mapping[str, QuantizedLayer], resolved: ResolvedPlan,
              out: str | os.PathLike[str], *, tokenizer: Any = None,
              source: str | os.PathLike[str] | None = None, meta: dict[str, Any] | None = None,
              overwrite: bool = False) -> Path:
    """Write the fake-quantized ``model`` as a mixq checkpoint folder at ``out``; returns ``out``.

    ``layers``: :func:`~mixq.export.layers.quantized_layers` of the model. ``source``: the model it
    came from (recorded; a folder equal to ``out`` is refused). An existing ``out`` is replaced only
    with ``overwrite=True``.
    """
    from safetensors.torch import save_file

    out = Path(out)
    source_dir = Path(source) if source is not None and Path(source).is_dir() else None
    check_target(out, source_dir, overwrite)
    unknown = sorted(set(layers) - set(resolved.by_name()))
    if unknown:
        raise ExportError(f"layers not in the resolved plan: {unknown[:5]}")
    floats = float_tensors(model, layers)
    stored = _stored_tensors(layers)
    clash = sorted(set(floats) & set(stored))
    if clash:
        raise ExportError(f"model tensors collide with packed names: {clash[:5]}")
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "mixq_version": mixq.__version__,
        "source": str(source) if source is not None else None, "plan": resolved.plan.to_dict(),
        "meta": dict(meta or {}),
        "tensors": {f"{n}.weight": tensor_entry(q.weight) for n, q in layers.items() if q.weight is not None},
        "layers": {n: layer_entry(q) for n, q in layers.items()},
    }
    with atomic_folder(out) as tmp:
        write_environment(tmp)
        _config(model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file({**floats, **stored}, str(tmp / WEIGHTS), metadata={"format": "pt", "mixq": FORMAT_NAME})
        resolved.plan.save(tmp / PLAN)
        manifest["files"] = file_records(tmp, skip=MANIFEST)
        write_manifest(tmp / MANIFEST, manifest)
    return out


def _spec_or_none(text: str | None) -> QuantSpec | None:
    return QuantSpec.parse(text) if text is not None else None


def _take(tensors: dict[str, Tensor], key: str) -> Tensor:
    if key not in tensors:
        raise ExportError(f"{WEIGHTS} lacks {key!r}, which the manifest lists")
    return tensors.pop(key)


def _layers(manifest: Mapping[str, Any], tensors: dict[str, Tensor]) -> dict[str, QuantizedLayer]:
    """Decode every layer of the manifest, removing the tensors it uses from ``tensors``."""
    out: dict[str, QuantizedLayer] = {}
    for name, entry in manifest["layers"].items():
        weight = None
        if entry["weight"] is not None:
            t = manifest["tensors"][entry["weight"]]
            parts = {suffix: _take(tensors, f"{entry['weight']}.{suffix}") for suffix in t["parts"]}
            try:
                spec, shape, dtype = QuantSpec.parse(t["spec"]), tuple(t["shape"]), parse_dtype(t["dtype"])
                weight = decode_tensor(parts, spec, shape, dtype)
            except ValueError as err:
                raise ExportError(f"{WEIGHTS}: tensor {entry['weight']}: {err}") from None
        static = None
        if entry["static"]:
            static = (_take(tensors, f"{name}.inputs.lo"), _take(tensors, f"{name}.inputs.hi"))
        signs = _take(tensors, f"{name}.signs") if entry["signs"] else None
        out[name] = QuantizedLayer(name, weight, _spec_or_none(entry["inputs"]), static,
                                   _spec_or_none(entry["outputs"]), entry["hadamard"], signs)
    return out


def read_mixq(path: str | os.PathLike[str]) -> Exported:
    """The checkpoint at ``path``: its fake-quant model (eval mode, quantizers enabled), its layers,
    resolved plan and manifest.

    Every file's size and SHA-256 is checked first; a missing, truncated or corrupt file raises
    :class:`ExportError` naming it.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not is_mixq_folder(path):
        raise ExportError(f"{path} is not a mixq checkpoint: it holds no {MANIFEST}")
    manifest = read_manifest(path / MANIFEST)
    for required in ("config.json", WEIGHTS):
        if required not in manifest["files"]:
            raise ExportError(f"{path / MANIFEST}: lists no {required}")
    verify_files(path, manifest)
    try:
        plan = Plan.from_dict(manifest["plan"])
    except PlanError as err:
        raise ExportError(f"{path / MANIFEST}: bad plan: {err}") from None
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as err:  # safetensors raises its own error type for a malformed file
        raise ExportError(f"{path / WEIGHTS}: not a readable safetensors file: {err}") from None
    layers = _layers(manifest, tensors)
    model = skeleton(path)
    resolved = resolve(plan, model)
    return Exported(fill(model, tensors, layers, resolved), layers, resolved, manifest)
