"""Reproducible uniform numbers for stochastic rounding, identical on every backend.

A counter-based hash of (seed, element index) gives each element its own 24-bit uniform number,
so the torch reference and the compiled kernels draw exactly the same noise, in any order, on any
number of threads. The seed is drawn once per call from a ``torch.Generator``.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX1 = 0x7FEB352D
MIX2 = 0x846CA68B


def draw_seed(generator: torch.Generator | None) -> int:
    """A 32-bit seed from ``generator`` (torch's default generator when None)."""
    return int(torch.randint(0, 1 << 31, (1,), generator=generator).item())


def hash32(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A 32-bit integer hash (int64 holding uint32) of int64 ``index`` and ``seed``."""
    h = (index * GOLDEN + seed) & MASK32
    h = h ^ (h >> 16)
    h = (h * MIX1) & MASK32
    h = h ^ (h >> 15)
    h = (h * MIX2) & MASK32
    return h ^ (h >> 16)


def uniform(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform numbers in [0, 1), multiples of 2**-24 (float64, ``shape``), element i from hash(i)."""
    n = 1
    for d in shape:
        n *= d
    idx = torch.arange(n, dtype=torch.int64, device=device)
    return ((hash32(idx, seed) >> 8).double() * 2.0**-24).reshape(shape)
