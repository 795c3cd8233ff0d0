"""The staging folder of a streamed quantization run, and the run folder assembled from it.

Layout of ``OUT.partial/`` (next to the run folder ``OUT``)::

    manifest.json                  what the run is (model, plan hash, calibration hash, blocks,
                                   batch size) and how many blocks are done
    block-00003.safetensors        block 3's quantized weights, under the checkpoint's names
    block-00003.scales.safetensors its layers' weight scales (``{layer}.{part}``), if any
    block-00003.ranges.safetensors its static activation quantizers' ranges (``{module}.lo/.hi``)
    block-00003.json               its layer reports, and the layers whose scales are None
    inputs-00004.pt                the calibration inputs of block 4 (the next block to quantize)
    inputs-00004.rank1.pt          rank 1's share of them, in a data-parallel run (rank 0 writes it)
    final.pt                       the last block's outputs, when a layer after the blocks needs data
                                   (``final.rank1.pt``: rank 1's)

Every file is written to a temporary name and renamed; the manifest is updated after a block's
files and the next inputs exist, and older inputs are deleted only after that, so a run killed at
any point resumes from the manifest's count. :func:`assemble` links the block shards into a run
folder (sharded safetensors with an index) that :func:`mixq.model.run_folder.load_quantized` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mixq.fileio import atomic_write, atomic_write_text
from mixq.model.lazy import DTYPE_BYTES

MANIFEST = "manifest.json"
STAGE_VERSION = 1


class ResumeError(ValueError):
    """A staging folder that does not belong to this run (other model, plan or calibration data)."""


@dataclass(frozen=True)
class RunKey:
    """What a resumed run must share with the interrupted one."""

    model: str
    plan: str
    calibration: str | None
    blocks: int
    batch_size: int
    ranks: int = 1  # processes of a data-parallel run: each stages its own share of the inputs


def plan_hash(plan: Any) -> str:
    """sha256 of the plan's JSON text."""
    return hashlib.sha256(plan.dumps("json").encode()).hexdigest()


def tokens_hash(tokens: Tensor | None) -> str | None:
    """sha256 of the calibration inputs (dtype, shape and values), None without calibration."""
    if tokens is None:
        return None
    h = hashlib.sha256(f"{tokens.dtype}{list(tokens.shape)}".encode())
    h.update(tokens.contiguous().numpy().tobytes())
    return h.hexdigest()


def staging_folder(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def _load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path)) if path.is_file() else {}


class Staging:
    """One run's staging folder: completed blocks, the next inputs, the manifest."""

    def __init__(self, folder: Path, key: RunKey, done: int) -> None:
        self.folder = folder
        self.key = key
        self.done = done

    @classmethod
    def open(cls, folder: Path, key: RunKey, resume: bool) -> Staging:
        """The staging folder for ``key``: the existing one when resuming (checked against ``key``),
        else a fresh one (an old folder is removed)."""
        manifest = folder / MANIFEST
        if resume and manifest.is_file():
            saved = json.loads(manifest.read_text())
            saved.setdefault("ranks", 1)
            wrong = [f"{k} (staged {saved.get(k)!r}, now {v!r})" for k, v in asdict(key).items()
                     if saved.get(k) != v]
            if wrong:
                raise ResumeError(f"cannot resume from {folder}: expected the same run, found a different "
                                  f"{'; '.join(wrong)}; rerun without --resume to start over")
            return cls(folder, key, int(saved["done"]))
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        stage = cls(folder, key, 0)
        stage.mark_done(0)
        return stage

    # --- files ---------------------------------------------------------------------------------
    def block_file(self, i: int, part: str = "") -> Path:
        return self.folder / f"block-{i:05d}{'.' + part if part else ''}.safetensors"

    def inputs_file(self, i: int, rank: int = 0) -> Path:
        return self.folder / f"inputs-{i:05d}{f'.rank{rank}' if rank else ''}.pt"

    def final_file(self, rank: int = 0) -> Path:
        return self.folder / f"final{f'.rank{rank}' if rank else ''}.pt"

    def mark_done(self, done: int) -> None:
        self.done = done
        atomic_write_text(self.folder / MANIFEST,
                          json.dumps({"version": STAGE_VERSION, **asdict(self.key), "done": done}, indent=1))

    # --- one block -----------------------------------------------------------------------------
    def save_block(self, i: int, weights: dict[str, Tensor], ranges: dict[str, Tensor],
                   scales: dict[str, Any], reports: dict[str, dict[str, Any]]) -> None:
        """Stage block ``i``: weights, activation ranges, scales (``GroupScales`` or None), reports."""
        from mixq.model.run_folder import SCALE_PARTS

        flat = {f"{name}.{part}": getattr(sc, part).detach().clone() for name, sc in scales.items()
                if sc is not None for part in SCALE_PARTS if getattr(sc, part) is not None}
        if flat:
            _save_tensors(self.block_file(i, "scales"), flat)
        if ranges:
            _save_tensors(self.block_file(i, "ranges"), ranges)
        info = {"reports": reports, "no_scales": [n for n, sc in scales.items() if sc is None],
                "scales": sorted(n for n, sc in scales.items() if sc is not None)}
        atomic_write_text(self.folder / f"block-{i:05d}.json", json.dumps(info, indent=1, default=str))
        _save_tensors(self.block_file(i), weights)

    def load_block_extras(self, i: int) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, dict]]:
        """``(ranges, scales, reports)`` staged for block ``i``."""
        from mixq.quant.scale import GroupScales

        info = json.loads((self.folder / f"block-{i:05d}.json").read_text())
        parts: dict[str, dict[str, Tensor]] = {}
        for key, value in _load_tensors(self.block_file(i, "scales")).items():
            name, part = key.rsplit(".", 1)
            parts.setdefault(name, {})[part] = value
        scales: dict[str, Any] = {n: None for n in info["no_scales"]}
        for name in info["scales"]:
            p = parts[name]
            scales[name] = GroupScales(p["scale"], p["block"], p.get("zero"), p.get("tensor"),
                                       p.get("offset"))
        return _load_tensors(self.block_file(i, "ranges")), scales, info["reports"]

    # --- calibration inputs --------------------------------------------------------------------
    def save_inputs(self, i: int, inputs: list[tuple[tuple, dict]], rank: int = 0) -> None:
        atomic_write(self.inputs_file(i, rank), lambda tmp: torch.save(inputs, tmp))

    def load_inputs(self, i: int, rank: int = 0) -> list[tuple[tuple, dict]]:
        path = self.inputs_file(i, rank)
        if not path.is_file():
            raise ResumeError(f"cannot resume from {self.folder}: expected the calibration inputs of block "
                              f"{i} ({path.name}), found none; rerun without --resume to start over")
        return torch.load(path, weights_only=True)

    def drop_inputs(self, i: int) -> None:
        """Delete every rank's inputs of block ``i``."""
        for rank in range(self.key.ranks):
            self.inputs_file(i, rank).unlink(missing_ok=True)

    def save_final(self, hidden: list[Tensor], rank: int = 0) -> None:
        atomic_write(self.final_file(rank), lambda tmp: torch.save(hidden, tmp))

    def load_final(self, rank: int = 0) -> list[Tensor] | None:
        path = self.final_file(rank)
        return torch.load(path, weights_only=True) if path.is_file() else None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def shard_name(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (no data copied; the staged file stays for a resume), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_shards(folder: Path, stage: Staging, outside: dict[str, Tensor]) -> None:
    """``folder``: the non-block tensors as shard 1, block ``i`` as shard ``i + 2``, and the index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    total = stage.key.blocks + 1
    weight_map: dict[str, str] = {}
    size = 0
    name = shard_name(1, total)
    save_file(outside, str(folder / name), metadata={"format": "pt"})
    for key, t in outside.items():
        weight_map[key] = name
        size += t.numel() * t.element_size()
    for i in range(stage.key.blocks):
        name = shard_name(i + 2, total)
        link_or_copy(stage.block_file(i), folder / name)
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = 1
                for s in sl.get_shape():
                    n *= s
                weight_map[key] = name
                size += n * DTYPE_BYTES.get(sl.get_dtype(), 4)
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
