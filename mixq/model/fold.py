"""Fold a positive per-channel scale ``s`` between two ops without changing the model's function.

For a scale group (``prev`` feeding ``linears``): ``scale_output_channels(prev, s)`` makes prev's
output ``y / s`` and ``scale_input_channels(linear, s)`` makes each linear compute
``(y / s) @ (W * s)^T = y @ W^T``. Math is done in fp32 and written back in the parameter's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mixq.model.arch import NORM_KINDS, ArchitectureError
from mixq.model.tree import is_hf_conv1d


def _check_scale(s: Tensor, n: int, what: str) -> Tensor:
    if s.dim() != 1 or s.numel() != n:
        raise ValueError(f"scale for {what} must have shape [{n}], found {list(s.shape)}")
    s = s.detach().float()
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError(f"scale for {what} must be finite and > 0, found min {s.min().item():.3g}")
    return s


def _write(param: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def scale_output_channels(prev: nn.Module, s: Tensor, norm_kind: str) -> None:
    """Divide ``prev``'s output channels by ``s`` ``[d]`` (fp32, > 0), in place.

    ``prev`` is a Linear / HF Conv1D (weight rows and bias divided by s) or a norm whose kind is
    given by ``norm_kind`` (class names are not inspected): "rms" (``w / s``), "layer"
    (``w / s``, ``b / s``) or "rms_plus_one" (Gemma, output ``x * (1 + w)``: ``w <- (1 + w) / s - 1``).
    """
    if isinstance(prev, nn.Linear) or is_hf_conv1d(prev):
        conv1d = is_hf_conv1d(prev)
        W = prev.weight.detach().float()  # Linear [out, in]; Conv1D [in, out]
        n_out = W.shape[1] if conv1d else W.shape[0]
        s = _check_scale(s, n_out, type(prev).__name__).to(W.device)
        _write(prev.weight, W / s[None, :] if conv1d else W / s[:, None])
        if prev.bias is not None:
            _write(prev.bias, prev.bias.detach().float() / s)
        return
    if norm_kind not in NORM_KINDS:
        raise ArchitectureError(f"norm_kind must be one of {NORM_KINDS}, found {norm_kind!r}")
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, Tensor):
        raise ArchitectureError(f"cannot fold a scale into {type(prev).__name__}: it has no weight "
                                "(expected an affine norm, a Linear or a Conv1D)")
    w = weight.detach().float()  # [d]
    s = _check_scale(s, w.numel(), f"{norm_kind} norm").to(w.device)
    _write(weight, (1.0 + w) / s - 1.0 if norm_kind == "rms_plus_one" else w / s)
    bias = getattr(prev, "bias", None)
    if isinstance(bias, Tensor):
        _write(bias, bias.detach().float() / s)


def scale_input_channels(linear: nn.Module, s: Tensor) -> None:
    """Multiply input column j of ``linear``'s weight by ``s_j`` (``s`` ``[in]``, > 0), in place.

    Linear ``W [out, in]``: ``W[:, j] *= s_j``; HF Conv1D ``[in, out]``: rows; Conv2d/Conv1d with
    groups == 1 ``[out, in, *k]``: input channel j.
    """
    W = linear.weight.detach().float()
    if is_hf_conv1d(linear):
        s = _check_scale(s, W.shape[0], "Conv1D").to(W.device)
        _write(linear.weight, W * s[:, None])
    elif isinstance(linear, nn.Linear):
        s = _check_scale(s, W.shape[1], "Linear").to(W.device)
        _write(linear.weight, W * s[None, :])
    elif isinstance(linear, (nn.Conv1d, nn.Conv2d)) and linear.groups == 1:
        s = _check_scale(s, W.shape[1], type(linear).__name__).to(W.device)
        _write(linear.weight, W * s.reshape(1, -1, *([1] * (W.dim() - 2))))
    else:
        raise ArchitectureError(f"cannot scale input channels of {type(linear).__name__}: expected Linear, "
                                "Conv1D or an ungrouped Conv1d/Conv2d")
