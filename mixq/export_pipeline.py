"""``mixq export``: a run folder, or a model and a plan, to a packed checkpoint that loads back exactly.

The steps are plain functions: :func:`exported_layers` gets the model and its layers' codes (from a run
folder, or by quantizing a model with a plan), :func:`choose_format` picks compressed-tensors when it
can express every layer, and :func:`export` writes the folder, reloads it and checks that the logits
of the reloaded model are bit-identical to the model that was quantized.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq.export.layers import ExportError, QuantizedLayer, quantized_layers
from mixq.model.plan_match import ResolvedPlan, count_bits
from mixq.plan import Plan

FORMATS = ("auto", "compressed-tensors", "mixq")
VERIFY_TOKENS = 64


@dataclass
class Source:
    """What an export starts from: the fake-quant model, its codes, plan, tokenizer and origin."""

    model: nn.Module
    layers: dict[str, QuantizedLayer]
    resolved: ResolvedPlan
    tokenizer: Any
    origin: Path | None  # the folder that must never be written over (source model or run folder)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportOutcome:
    """Where the export went, in which format, its size against the bits accounting, and the check."""

    out: Path
    format: str
    layers: int
    schemes: dict[str, int]
    bytes_on_disk: int
    header_bytes: int
    bytes_accounted: float
    verified: bool | None
    max_logit_diff: float | None
    seconds: float
    unsupported: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["out"] = str(self.out)
        acc = self.bytes_accounted
        d["size_ratio"] = self.bytes_on_disk / acc if acc else None  # headers included
        d["payload_ratio"] = (self.bytes_on_disk - self.header_bytes) / acc if acc else None
        return d


def exported_layers(source: str | os.PathLike[str], plan: Plan | None = None, *,
                    quantize_kw: dict[str, Any] | None = None,
                    status: Callable[[str], None] | None = None) -> Source:
    """The model to export: a run folder as saved (``plan`` None), or ``source`` quantized with ``plan``.

    ``quantize_kw`` goes to :func:`mixq.pipeline.quantize` (calibration, rotation, progress).
    """
    from mixq.model.load import resolve as resolve_model
    from mixq.model.run_folder import is_run_folder
    from mixq.pipeline import load_tokenizer, quantize

    say = status or (lambda _m: None)
    if plan is None:
        if not is_run_folder(source):
            raise ExportError(f"{source} is not a mixq run folder; give a plan (--plan) to quantize a model")
        from mixq.export.load import read

        say(f"reading {source}")
        exported = read(source)
        return Source(exported.model, exported.layers, exported.resolved, load_tokenizer(source),
                      Path(source), exported.meta)
    outcome = quantize(str(source), plan, status=say, **(quantize_kw or {}))
    resolved = outcome.resolved
    layers = quantized_layers(outcome.model, resolved, outcome.report.scales)
    meta = {"model": str(source), "report": outcome.report.to_json()}
    return Source(outcome.model, layers, resolved, outcome.tokenizer, resolve_model(str(source)), meta)


def check_output(out: str | os.PathLike[str], source: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse, before any work, an ``out`` that exists (without ``overwrite``) or is the source itself."""
    from mixq.model.load import ModelLoadError, resolve as resolve_model
    from mixq.model.run_folder import check_target

    try:
        origin = Path(source) if Path(source).is_dir() else resolve_model(str(source))
    except ModelLoadError:
        origin = None
    check_target(Path(out), origin, overwrite)


def unsupported_layers(layers: dict[str, QuantizedLayer]) -> dict[str, str]:
    """Layers compressed-tensors cannot express, with the reason for each."""
    from mixq.export.compressed import ct_scheme

    reasons = {name: ct_scheme(layer) for name, layer in layers.items()}
    return {name: r for name, r in reasons.items() if isinstance(r, str)}


def choose_format(requested: str, layers: dict[str, QuantizedLayer]) -> tuple[str, dict[str, str]]:
    """The format to write and, for ``auto``, the layers compressed-tensors cannot express (with why).

    ``auto``: compressed-tensors when it expresses every layer, else mixq's own format. An explicit
    format is taken as it is (the compressed-tensors writer refuses what it cannot express).
    """
    if requested not in FORMATS:
        raise ExportError(f"unknown export format {requested!r}; choose one of {', '.join(FORMATS)}")
    if requested != "auto":
        return requested, {}
    unsupported = unsupported_layers(layers)
    return ("mixq" if unsupported else "compressed-tensors"), unsupported


def _scheme_counts(layers: dict[str, QuantizedLayer]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in layers.values():
        key = str(layer.weight.spec) if layer.weight is not None else "float"
        if layer.inputs is not None:
            key += f"@{layer.inputs}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def disk_bytes(folder: Path) -> tuple[int, int]:
    """Bytes of the weight files (``*.safetensors``) in ``folder``: in all, and in their JSON headers."""
    total = header = 0
    for f in folder.glob("*.safetensors"):
        total += f.stat().st_size
        with f.open("rb") as fh:
            header += 8 + int.from_bytes(fh.read(8), "little")
    return total, header


def accounted_bytes(src: Source, float_bytes: int) -> float:
    """Bytes the bits accounting gives: the packed layers' bits plus every float tensor at its dtype."""
    bits = count_bits(src.resolved)
    return bits["quantized_bits_per_weight"] * bits["quantized_params"] / 8 + float_bytes


def _probe(model: nn.Module, tokenizer: Any) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0) or len(tokenizer)
    return torch.randint(0, vocab, (1, VERIFY_TOKENS), generator=torch.Generator().manual_seed(0))


def _outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def export(src: Source, out: str | os.PathLike[str], *, format: str = "auto", overwrite: bool = False,
           verify: bool = True) -> ExportOutcome:
    """Write ``src`` to ``out`` in ``format``; with ``verify``, reload it with mixq and compare outputs.

    The check feeds one fixed window of ``VERIFY_TOKENS`` random token ids to both models; the
    reloaded model must give bit-identical logits (ExportError otherwise, the folder is left for
    inspection).
    """
    from mixq.export.layers import float_tensors

    t0 = time.perf_counter()
    out = Path(out)
    chosen, unsupported = choose_format(format, src.layers)
    if chosen == "compressed-tensors":
        from mixq.export.compressed import save_compressed_tensors as write
    else:
        from mixq.export.mixq_format import save_mixq as write
    write(src.model, src.layers, src.resolved, out, tokenizer=src.tokenizer, source=src.origin,
          meta=src.meta, overwrite=overwrite)
    floats = sum(t.numel() * t.element_size() for t in float_tensors(src.model, src.layers).values())
    verified, diff = None, None
    if verify:
        from mixq.export.load import read

        ids = _probe(src.model, src.tokenizer)
        reloaded = read(out).model
        a, b = _outputs(src.model, ids), _outputs(reloaded, ids)
        diff = float((a - b).abs().max())
        verified = bool(torch.equal(a, b))
        if not verified:
            raise ExportError(f"the model reloaded from {out} differs from the quantized model "
                              f"(max logit difference {diff:.3g}); the folder is kept for inspection")
    return ExportOutcome(out, chosen, len(src.layers), _scheme_counts(src.layers), *disk_bytes(out),
                         accounted_bytes(src, floats), verified, diff, time.perf_counter() - t0, unsupported)
