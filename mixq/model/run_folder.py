"""The output folder of ``mixq quantize``: a fake-quant Hugging Face model that reloads exactly.

Layout::

    OUT/config.json, model.safetensors, tokenizer files   the fake-quant fp32 weights (rotations folded),
                                                          loadable by plain transformers (weight-only
                                                          plans then compute exactly what mixq evaluated)
    OUT/plan.yaml                                         the plan that was applied
    OUT/quantizers.safetensors                            calibrated ranges of static activation quantizers
    OUT/scales.safetensors                                the scales each weight was quantized with (what
                                                          ``mixq export`` needs to recover exact codes)
    OUT/mixq.json                                         version, source model, rotation, report

:func:`load_quantized` rebuilds the model with its online rotations and activation / KV quantizers.
The folder is written next to its destination and renamed into place; an existing folder is only
replaced with ``overwrite=True``, and never when it is the source model itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from torch import nn

import mixq
from mixq.fileio import atomic_folder
from mixq.run_info import write_environment
from mixq.model.load import ModelLoadError, load_model
from mixq.model.plan_match import ResolvedPlan, resolve
from mixq.model.qmodules import ActQuantizer, QuantLinear, unwrap, wrap
from mixq.model.quantizers import install_quantizers
from mixq.plan import Plan
from mixq.quant.scale import GroupScales

META = "mixq.json"
PLAN = "plan.yaml"
QUANTIZERS = "quantizers.safetensors"
SCALES = "scales.safetensors"
SCALE_PARTS = ("scale", "block", "zero", "tensor", "offset")


class OutputExistsError(FileExistsError, ValueError):
    """The output folder exists and overwriting was not asked for (or it is the source model)."""


def is_run_folder(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / META).is_file()


def check_target(out: Path, source: Path | None, overwrite: bool) -> None:
    if source is not None and out.resolve() == source.resolve():
        raise OutputExistsError(f"refusing to write the quantized model over its source model {source}")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} exists; pass --overwrite (overwrite=True) to replace it")


def _wrappers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def save_quantized(model: nn.Module, tokenizer: Any, resolved: ResolvedPlan, out: str | os.PathLike[str], *,
                   source: str | os.PathLike[str] | None = None, meta: dict[str, Any] | None = None,
                   overwrite: bool = False, scales: Mapping[str, GroupScales | None] | None = None) -> Path:
    """Write ``model`` (fake-quantized in place by the runner) as a run folder at ``out``.

    ``scales``: the runner's ``QuantizeReport.scales``, saved so that the run can be exported packed.
    """
    out = Path(out)
    source_dir = Path(source) if source is not None and Path(source).is_dir() else None
    check_target(out, source_dir, overwrite)
    wrappers = _wrappers(model)
    ranges = {f"{name}.{part}.{key}": getattr(getattr(w, part), key).detach().clone().contiguous()
              for name, w in wrappers.items() for part in ("inputs", "outputs")
              if isinstance(getattr(w, part), ActQuantizer) and getattr(w, part).static
              for key in ("lo", "hi")}
    with atomic_folder(out) as tmp:
        unwrap(model)
        try:
            model.save_pretrained(tmp)
        finally:
            for name, w in wrappers.items():
                wrap(model, name, hadamard=w.hadamard, signs=w.signs, inputs=w.inputs, outputs=w.outputs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        resolved.plan.save(tmp / PLAN)
        if ranges:
            from safetensors.torch import save_file

            save_file(ranges, str(tmp / QUANTIZERS))
        _save_scales(scales or {}, tmp / SCALES)
        info = {"mixq_version": mixq.__version__, "source": str(source) if source is not None else None,
                **(meta or {})}
        (tmp / META).write_text(json.dumps(info, indent=1, default=str) + "\n")
        write_environment(tmp)
    return out


def _save_scales(scales: Mapping[str, GroupScales | None], path: Path) -> None:
    from safetensors.torch import save_file

    flat = {f"{name}.{part}": getattr(sc, part).detach().clone() for name, sc in scales.items()
            if sc is not None for part in SCALE_PARTS if getattr(sc, part) is not None}
    if flat:
        save_file(flat, str(path))


def load_scales(path: str | os.PathLike[str]) -> dict[str, GroupScales]:
    """The scales saved in a run folder, by layer name (empty for runs saved without them)."""
    file = Path(path) / SCALES
    if not file.is_file():
        return {}
    from safetensors.torch import load_file

    parts: dict[str, dict[str, Any]] = {}
    for key, value in load_file(str(file)).items():
        name, part = key.rsplit(".", 1)
        parts.setdefault(name, {})[part] = value
    return {name: GroupScales(p["scale"], p["block"], p.get("zero"), p.get("tensor"), p.get("offset"))
            for name, p in parts.items()}


def load_quantized(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run folder with its rotations and quantizers enabled, and its ``mixq.json``."""
    model, _, meta = load_run(path)
    return model, meta


def load_run(path: str | os.PathLike[str]) -> tuple[nn.Module, ResolvedPlan, dict[str, Any]]:
    """:func:`load_quantized`, with the plan as resolved against the model before it was wrapped."""
    path = Path(path)
    if not is_run_folder(path):
        raise ModelLoadError(f"expected a mixq run folder holding {META}, found none in {path}")
    meta = json.loads((path / META).read_text())
    model = load_model(path)
    plan = Plan.load(path / PLAN)
    resolved = resolve(plan, model)
    install_quantizers(model, resolved, rotate_weights=False)
    if (path / QUANTIZERS).is_file():
        from safetensors.torch import load_file

        for key, value in load_file(str(path / QUANTIZERS)).items():
            owner, attr = key.rsplit(".", 1)
            setattr(model.get_submodule(owner), attr, value)
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = True
    model.eval()
    return model, resolved, meta
