"""Models whose weights stay on disk: a lazy safetensors reader and a skeleton on the meta device.

- :class:`LazyCheckpoint` indexes a Hugging Face folder's ``model.safetensors`` (or the shards named
  by ``model.safetensors.index.json``) from the file headers only, and reads the tensors asked for,
  one file opened at a time and closed again (so no mapping of a whole checkpoint stays resident).
- :func:`meta_skeleton` builds the model class of a folder's ``config.json`` on the meta device
  (no weight memory); buffers that are not saved in checkpoints (rotary ``inv_freq``) are rebuilt
  on the CPU.
- :func:`fill` / :func:`release` put real tensors into named parameters and give them back to the
  meta device; :func:`owner` finds a tensor's module through mixq's :class:`QuantLinear` wrappers,
  so names stay the checkpoint's names after quantizers are installed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mixq.model.load import ModelLoadError
from mixq.model.qmodules import inner
from mixq.model.tree import get_module, set_module

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is (from the safetensors header)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * DTYPE_BYTES.get(self.dtype, 4)


class LazyCheckpoint:
    """The tensors of a Hugging Face folder's safetensors files, read on demand.

    Only headers are read at construction. :meth:`read` opens each needed file with
    ``safetensors.safe_open``, copies the tensors out and closes it.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        files = self._files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self.tensors[name] = TensorInfo(file, sl.get_dtype(), tuple(sl.get_shape()))

    def _files(self) -> list[Path]:
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [self.folder / f for f in dict.fromkeys(weight_map.values())]
        if (self.folder / SINGLE).is_file():
            return [self.folder / SINGLE]
        raise ModelLoadError(f"expected {SINGLE} or {INDEX} in {self.folder}, found neither "
                             "(streaming reads safetensors checkpoints only)")

    def names(self) -> list[str]:
        return list(self.tensors)

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        """Stored size in bytes of ``names`` (all tensors when None)."""
        keys = self.tensors if names is None else names
        return sum(self.tensors[n].nbytes for n in keys)

    def read(self, names: Iterable[str], dtype: torch.dtype | None = torch.float32) -> dict[str, Tensor]:
        """``{name: tensor}`` for ``names``; floating tensors are cast to ``dtype`` (None: as stored)."""
        from safetensors import safe_open

        wanted = list(names)
        missing = [n for n in wanted if n not in self.tensors]
        if missing:
            raise ModelLoadError(f"expected tensors {missing[:3]} in the checkpoint of {self.folder}, "
                                 f"found none of that name ({len(self.tensors)} stored)")
        by_file: dict[Path, list[str]] = {}
        for n in wanted:
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out: dict[str, Tensor] = {}
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for n in group:
                    t = f.get_tensor(n)
                    out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


def meta_skeleton(folder: str | os.PathLike[str]) -> nn.Module:
    """The model of ``folder/config.json`` (class from ``architectures``) with parameters on the meta
    device, in eval mode; buffers computed from the config (not stored) are real CPU tensors."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls if hasattr(cls, "_from_config") else transformers.AutoModel
    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.float32) if cls is not transformers.AutoModel \
            else cls.from_config(config, dtype=torch.float32)
    _rebuild_meta_buffers(model)
    return model.eval()


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Re-create on the CPU each module whose own buffers are meta and that has no parameters
    (rotary embeddings: their buffers are computed from the config, never stored)."""
    for name, module in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in module._buffers.values()):
            continue
        if any(True for _ in module.parameters(recurse=False)) or not hasattr(module, "config") or not name:
            raise ModelLoadError(f"expected buffer-only modules (rotary embeddings) to hold meta buffers, "
                                 f"found {type(module).__name__} at {name!r}: it cannot be streamed")
        with torch.device("cpu"):
            rebuilt = type(module)(config=module.config)
        set_module(model, name, rebuilt.eval())


def state_names(model: nn.Module) -> list[str]:
    """The names a checkpoint of ``model`` stores: parameters and persistent buffers, a tensor shared
    by several names (tied embeddings) under its first name only."""
    seen: set[int] = set()
    names = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(module, attribute)`` holding tensor ``name`` (``a.b.weight``), looking through wrappers."""
    path, _, attr = name.rpartition(".")
    return inner(get_module(model, path)), attr


def tensor_of(model: nn.Module, name: str) -> Tensor:
    module, attr = owner(model, name)
    return getattr(module, attr)


def fill(model: nn.Module, tensors: dict[str, Tensor], aliases: dict[str, list[str]] | None = None) -> None:
    """Set each named parameter / buffer of ``model`` to the given tensor (shape must match).

    ``aliases``: other names sharing the same parameter (tied weights), which get the same object.
    """
    for name, value in tensors.items():
        module, attr = owner(model, name)
        old = getattr(module, attr)
        if tuple(old.shape) != tuple(value.shape):
            raise ModelLoadError(f"expected {name} of shape {list(old.shape)}, found {list(value.shape)} "
                                 "in the checkpoint")
        new = nn.Parameter(value, requires_grad=False) if attr in module._parameters else value
        for n in [name, *(aliases or {}).get(name, [])]:
            m, a = owner(model, n)
            setattr(m, a, new)


def release(model: nn.Module, names: Iterable[str]) -> None:
    """Give the named tensors back to the meta device (same shape and dtype, no memory)."""
    for name in names:
        module, attr = owner(model, name)
        old = getattr(module, attr)
        empty = torch.empty(old.shape, dtype=old.dtype, device="meta")
        is_param = attr in module._parameters
        setattr(module, attr, nn.Parameter(empty, requires_grad=False) if is_param else empty)


def trim_heap() -> None:
    """Hand freed heap memory back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    Block-sized tensors freed one after another otherwise stay in the C heap (glibc raises its
    mmap threshold after the first large free), and the resident size grows by about a block per
    block although nothing is alive.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """``{first name: [other names]}`` for parameters shared under several names."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {g[0]: g[1:] for g in groups.values() if len(g) > 1}
