"""Granularity: which elements share one scale.

Every granularity maps a tensor to a ``[G, n]`` matrix of groups (one scale per row) and back.
Shapes that do not divide are refused with an error naming the shape and the size; mixq does not
pad silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch


class GroupSizeError(ValueError):
    """A granularity that does not fit a tensor's shape."""


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def token(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per index of ``axis`` (axis 0 of a ``[out, in]`` weight: per output channel)."""

    axis: int = 0

    def token(self) -> str:
        return "channel" if self.axis == 0 else f"channel@{self.axis}"


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive elements along ``axis`` (default: the last, the input dim)."""

    size: int
    axis: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"group size must be a positive integer, got {self.size!r}")

    def token(self) -> str:
        return f"g{self.size}" if self.axis == -1 else f"g{self.size}@{self.axis}"


@dataclass(frozen=True)
class PerBlock:
    """One scale per ``rows x cols`` tile of the last two axes."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"block tiles must be positive, got {self.rows}x{self.cols}")

    def token(self) -> str:
        return f"b{self.rows}x{self.cols}"


@dataclass(frozen=True)
class PerToken:
    """One scale per row of the last axis, computed on the fly (dynamic activation quantization)."""

    def token(self) -> str:
        return "token"


Granularity = Union[PerTensor, PerChannel, PerGroup, PerBlock, PerToken]


def _axis(axis: int, ndim: int, shape: tuple[int, ...], what: str) -> int:
    if not -ndim <= axis < ndim:
        raise GroupSizeError(f"{what} axis {axis} does not exist in a tensor of shape {shape}")
    return axis % ndim


@dataclass(frozen=True)
class Grouping:
    """The reshaping of one tensor shape into ``[G, n]`` groups, with its inverse."""

    shape: tuple[int, ...]
    granularity: Granularity

    def __post_init__(self) -> None:
        self.num_groups  # validates the shape

    @property
    def group_size(self) -> int:
        return math.prod(self.shape) // self.num_groups if self.num_groups else 0

    @property
    def num_groups(self) -> int:
        g, shape, nd = self.granularity, self.shape, len(self.shape)
        numel = math.prod(shape)
        if isinstance(g, PerTensor):
            return 1
        if nd == 0:
            raise GroupSizeError(f"{g.token()} granularity needs a tensor with axes, got a scalar")
        if isinstance(g, PerChannel):
            return shape[_axis(g.axis, nd, shape, "channel")]
        if isinstance(g, PerToken):
            return numel // shape[-1] if shape[-1] else 0
        if isinstance(g, PerGroup):
            d = shape[_axis(g.axis, nd, shape, "group")]
            if d % g.size:
                raise GroupSizeError(
                    f"group size {g.size} does not divide axis {g.axis} of length {d} (tensor shape "
                    f"{shape}); choose a divisor of {d}, e.g. {_divisors_hint(d)}")
            return numel // g.size
        if isinstance(g, PerBlock):
            if nd < 2 or shape[-2] % g.rows or shape[-1] % g.cols:
                raise GroupSizeError(
                    f"{g.rows}x{g.cols} tiles do not divide the last two axes of shape {shape}")
            return numel // (g.rows * g.cols)
        raise TypeError(f"unknown granularity {g!r}")

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of ``shape`` -> ``[G, n]`` (a view where the layout allows, else a copy)."""
        g, nd = self.granularity, len(self.shape)
        if isinstance(g, PerTensor):
            return x.reshape(1, -1)
        if isinstance(g, PerChannel):
            return x.movedim(g.axis % nd, 0).reshape(self.num_groups, -1)
        if isinstance(g, PerToken):
            return x.reshape(-1, self.shape[-1])
        if isinstance(g, PerGroup):
            return x.movedim(g.axis % nd, -1).reshape(-1, g.size)
        R, C = self.shape[-2:]
        t = x.reshape(*self.shape[:-2], R // g.rows, g.rows, C // g.cols, g.cols)
        return t.transpose(-3, -2).reshape(-1, g.rows * g.cols)

    def from_groups(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_groups`: ``[G, n]`` -> a tensor of ``shape``."""
        g, nd, shape = self.granularity, len(self.shape), self.shape
        if isinstance(g, (PerTensor, PerToken)):
            return y.reshape(shape)
        if isinstance(g, (PerChannel, PerGroup)):
            a = g.axis % nd
            rest = [s for i, s in enumerate(shape) if i != a]
            if isinstance(g, PerChannel):
                return y.reshape([shape[a], *rest]).movedim(0, a)
            return y.reshape([*rest, shape[a]]).movedim(-1, a)
        R, C = shape[-2:]
        t = y.reshape(*shape[:-2], R // g.rows, C // g.cols, g.rows, g.cols)
        return t.transpose(-3, -2).reshape(shape)


def _divisors_hint(d: int) -> str:
    divs = [k for k in (16, 32, 64, 96, 128, 192, 256) if d % k == 0]
    return ", ".join(map(str, divs)) if divs else "a smaller group"
