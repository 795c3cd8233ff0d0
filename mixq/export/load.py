"""``mixq.load``: any folder mixq writes, back to the fake-quant model it was evaluated as.

Three kinds of folder are recognised by what they hold: mixq's own packed format (a manifest), a
compressed-tensors checkpoint (``quantization_config`` in ``config.json``) and a run folder of
``mixq quantize`` (fake-quant weights and ``mixq.json``). Packed folders verify their checksums
before anything is decoded.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from mixq.export.layers import ExportError, Exported, quantized_layers


def kind_of(path: str | os.PathLike[str]) -> str:
    """``mixq`` | ``compressed-tensors`` | ``run``; ExportError for a folder that is none of them."""
    from mixq.export.compressed import is_compressed_tensors_folder
    from mixq.export.mixq_format import is_mixq_folder
    from mixq.model.run_folder import is_run_folder

    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not a folder")
    if is_mixq_folder(path):
        return "mixq"
    if is_compressed_tensors_folder(path):
        return "compressed-tensors"
    if is_run_folder(path):
        return "run"
    raise ExportError(f"{path} is neither a mixq export, a compressed-tensors checkpoint nor a mixq run folder")


def read(path: str | os.PathLike[str]) -> Exported:
    """The model of ``path`` (fake-quant, quantizers enabled, eval mode), its layers' codes and its plan."""
    kind = kind_of(path)
    if kind == "mixq":
        from mixq.export.mixq_format import read_mixq

        return read_mixq(path)
    if kind == "compressed-tensors":
        from mixq.export.compressed import read_compressed_tensors

        return read_compressed_tensors(path)
    from mixq.model.run_folder import load_run, load_scales

    model, resolved, meta = load_run(path)
    layers = quantized_layers(model, resolved, load_scales(path))
    return Exported(model, layers, resolved, meta)


def load(path: str | os.PathLike[str]) -> nn.Module:
    """The fake-quant model saved at ``path`` (a mixq export, compressed-tensors or a run folder)."""
    kind = kind_of(path)
    if kind == "run":
        from mixq.model.run_folder import load_quantized

        return load_quantized(path)[0]
    return read(path).model
