"""Cost models of a choice: bits (every scale counted), bytes, bit operations and measured latency.

A cost matrix is ``[L, C]`` float64 over profiled layers × candidates; NaN marks a candidate that does not
fit a layer (its group size does not divide the weight). Costs are additive over layers, which is what
makes the search a multiple-choice knapsack.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mixq.plan.candidates import Candidate
from mixq.search.errors import SearchError

if TYPE_CHECKING:
    from mixq.sensitivity.table import LayerInfo

COST_KINDS = ("bits", "bytes", "bops", "latency")


class LatencyTable:
    """Measured seconds per (layer, candidate), read from a CSV with header ``layer,candidate,seconds``.

    ``layer`` is a module name or a shape ``OUTxIN`` (applies to every layer of that weight shape); a
    name entry wins over a shape entry.
    """

    def __init__(self, entries: dict[tuple[str, str], float], source: str = "") -> None:
        self.entries = dict(entries)
        self.source = source

    @staticmethod
    def load(path: str | os.PathLike[str]) -> LatencyTable:
        """Read the CSV; ValueError naming the file and line of a bad row."""
        path = Path(path)
        if not path.is_file():
            raise SearchError(f"expected a latency table CSV (layer,candidate,seconds), found no file at "
                              f"{path}")
        entries: dict[tuple[str, str], float] = {}
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            if header != ["layer", "candidate", "seconds"]:
                raise SearchError(f"{path}:1: expected the header 'layer,candidate,seconds', "
                                  f"found {','.join(header)!r}")
            for line, row in enumerate(reader, start=2):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != 3:
                    raise SearchError(f"{path}:{line}: expected 3 fields (layer,candidate,seconds), "
                                      f"found {len(row)}")
                layer, cand, text = (cell.strip() for cell in row)
                try:
                    seconds = float(text)
                except ValueError:
                    seconds = math.nan
                if not layer or not cand or not math.isfinite(seconds) or seconds < 0:
                    raise SearchError(f"{path}:{line}: expected a layer, a candidate and seconds >= 0, "
                                      f"found {','.join(row)!r}")
                if (layer, cand) in entries:
                    raise SearchError(f"{path}:{line}: ({layer}, {cand}) appears twice")
                entries[(layer, cand)] = seconds
        return LatencyTable(entries, str(path))

    def seconds(self, layer: LayerInfo, candidate: str) -> float:
        """Seconds of ``layer`` under ``candidate``: by module name first, then by shape ``OUTxIN``."""
        for key in (layer.name, f"{layer.shape[0]}x{layer.shape[1]}"):
            if (key, candidate) in self.entries:
                return self.entries[(key, candidate)]
        where = f" in {self.source}" if self.source else ""
        raise SearchError(f"latency table{where} has no entry for layer {layer.name} (shape "
                          f"{layer.shape[0]}x{layer.shape[1]}) and candidate {candidate}")


def cost_matrix(layers: Sequence[LayerInfo], candidates: Sequence[Candidate], kind: str,
                latency: LatencyTable | None = None) -> np.ndarray:
    """``[L, C]`` float64 costs of every (layer, candidate); NaN where the candidate does not fit.

    ``bits``: total weight bits, every scale counted; ``bytes``: bits / 8; ``bops``: macs × weight bits
    per weight × activation bits; ``latency``: seconds from ``latency`` (required).
    """
    if kind not in COST_KINDS:
        raise SearchError(f"unknown cost kind {kind!r}; expected one of {', '.join(COST_KINDS)}")
    if kind == "latency" and latency is None:
        raise SearchError("a latency constraint needs a latency table (CSV layer,candidate,seconds)")
    out = np.full((len(layers), len(candidates)), np.nan, dtype=np.float64)
    bits_cache: dict[tuple[tuple[int, int], int], float] = {}
    for i, layer in enumerate(layers):
        shape = (int(layer.shape[0]), int(layer.shape[1]))
        for j, cand in enumerate(candidates):
            if (shape, j) not in bits_cache:
                fits = cand.fits(shape) is None
                bits_cache[(shape, j)] = float(cand.weight_bits(shape)) if fits else math.nan
            bits = bits_cache[(shape, j)]
            if math.isnan(bits):
                continue
            if kind == "bits":
                out[i, j] = bits
            elif kind == "bytes":
                out[i, j] = bits / 8.0
            elif kind == "bops":
                out[i, j] = float(layer.macs) * (bits / math.prod(shape)) * cand.activation_bits
            else:
                out[i, j] = latency.seconds(layer, cand.name)  # type: ignore[union-attr]
    return out


def bits_per_weight(layers: Sequence[LayerInfo], candidates: Sequence[Candidate],
                    choice: np.ndarray) -> float:
    """Total weight bits of ``choice`` (``[L]`` candidate indices) over the total parameters of ``layers``."""
    choice = np.asarray(choice)
    if choice.shape != (len(layers),):
        raise SearchError(f"expected a choice of {len(layers)} candidate indices, found shape "
                          f"{list(choice.shape)}")
    total_bits = 0.0
    total_params = 0
    for layer, j in zip(layers, choice):
        shape = (int(layer.shape[0]), int(layer.shape[1]))
        cand = candidates[int(j)]
        reason = cand.fits(shape)
        if reason is not None:
            raise SearchError(f"layer {layer.name}: {reason}")
        total_bits += cand.weight_bits(shape)
        total_params += math.prod(shape)
    return total_bits / total_params if total_params else 0.0
