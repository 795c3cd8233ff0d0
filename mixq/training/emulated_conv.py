"""Emulated low-precision 2-D convolution: im2col (``unfold``) followed by :func:`quantized_linear`.

A ``Conv2d`` with weight ``[out, C, kh, kw]`` on ``x`` ``[N, C, H, W]`` is the GEMM
``Y = X_col W^T`` with ``X_col = unfold(x)`` ``[N * L, C * kh * kw]`` (``L = Ho * Wo`` output positions)
and ``W`` ``[out, C * kh * kw]``. Running that GEMM through :func:`quantized_linear` quantizes the
forward, dgrad and wgrad operands exactly as for a linear layer (reduction dimension
``C * kh * kw`` last; the "tokens" are the ``N * L`` output positions). ``fold`` (the adjoint of
``unfold``) carries the data gradient back to ``x`` through autograd.

Only ``groups == 1`` and ``padding_mode == "zeros"`` are emulated; anything else raises ValueError.
With every format None the result equals ``F.conv2d`` up to fp32 summation order (not bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixq.training.emulated import GemmFormats, quantized_linear
from mixq.training.scaling import ScalingState


class EmulatedConv2d(nn.Module):
    """An ``nn.Conv2d`` whose GEMMs run through :func:`quantized_linear` (shares the conv's parameters).

    Stochastic rounding draws from a private generator seeded with ``formats.seed``.
    """

    def __init__(self, conv: nn.Conv2d, formats: GemmFormats) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"emulated convolution needs groups=1, zero padding given as numbers; got "
                             f"groups={conv.groups}, padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r}")
        if not isinstance(formats, GemmFormats):
            raise TypeError(f"formats must be GemmFormats, got {type(formats).__name__}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.weight = conv.weight                                            # [out, C, kh, kw]
        self.bias = conv.bias
        self.formats = formats
        self.scaling: ScalingState | None = None
        self.generator = torch.Generator().manual_seed(formats.seed)

    def forward(self, x: Tensor) -> Tensor:
        N, _, H, W_in = x.shape
        kh, kw = self.kernel_size
        Ho = (H + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        Wo = (W_in + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)                                  # [N, C*kh*kw, L]
        X = cols.transpose(1, 2)                                             # [N, L, C*kh*kw]
        Wm = self.weight.reshape(self.out_channels, -1)                      # [out, C*kh*kw]
        Y = quantized_linear(X, Wm, self.bias, self.formats, self.scaling, generator=self.generator)
        return Y.transpose(1, 2).reshape(N, self.out_channels, Ho, Wo)       # [N, out, Ho, Wo]

    def to_conv(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the same parameter objects."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)
        conv.weight = self.weight
        if self.bias is not None:
            conv.bias = self.bias
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, "
                f"padding={self.padding}, {self.formats.describe()}")


__all__ = ["EmulatedConv2d"]
