"""``fake_quantize``, ``quantize`` and ``dequantize``: the numeric truth of mixq.

For a group ``X_g`` with scale ``s_g`` (fp32), the element value is ``q = round_F(fp32(X_g / s_g))``
on the element format ``F``, and the fake-quantized value is ``fp32(q * s_g)``; asymmetric
integers use ``r = clamp(round(X_g / s_g) + z_g)`` and ``fp32(r - z_g) * s_g``.

Non-finite inputs: a group holding NaN or inf gets a NaN scale, so the whole group decodes to NaN
(the OCP MX rule, applied to every granularity): nothing non-finite is silently turned into numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.formats import IntFormat, Rounding
from mixq.formats.base import round_integers
from mixq.quant import kernels, noise
from mixq.quant.granularity import Grouping
from mixq.quant.scale import GroupScales, group_range, kernel_scales, scales_for_range, tensor_scale
from mixq.quant.spec import MSEClip, QuantSpec


def _as_spec(spec: QuantSpec | str) -> QuantSpec:
    return spec if isinstance(spec, QuantSpec) else QuantSpec.parse(spec)


BACKENDS = ("auto", "torch", "numba")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"quantization needs a floating-point tensor, got {x.dtype}; convert with .float()")


def element_values(X: torch.Tensor, sc: GroupScales, spec: QuantSpec, seed: int) -> torch.Tensor:
    """Element values ``q`` ([G, n] fp32; asymmetric: the integers ``r``) of groups ``X`` ([G, n] fp32)."""
    u = noise.uniform(tuple(X.shape), seed, X.device) if spec.rounding is Rounding.STOCHASTIC else None
    if sc.offset is not None:  # r = qmin + round((x - m) / s)
        y = (X - sc.offset[:, None]) / sc.scale[:, None]
    else:
        y = X / sc.scale[:, None]
    if sc.zero is None and sc.offset is None:
        return spec.format.round(y, spec.rounding, u)
    fmt = spec.format
    assert isinstance(fmt, IntFormat)
    shift = fmt.qmin if sc.offset is not None else sc.zero[:, None].double()
    return (round_integers(y.double(), spec.rounding, u) + shift).clamp(fmt.qmin, fmt.qmax).float()


def decode_groups(q: torch.Tensor, sc: GroupScales, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantized groups ([G, n] fp32) from element values ``q`` and scales."""
    if sc.offset is not None:
        qmin = spec.format.qmin  # type: ignore[attr-defined]  (offsets need integer elements)
        return (q - qmin) * sc.scale[:, None] + sc.offset[:, None]
    if sc.zero is None:
        return q * sc.scale[:, None]
    return (q - sc.zero[:, None]) * sc.scale[:, None]


def qdq_groups(X: torch.Tensor, sc: GroupScales, spec: QuantSpec, seed: int, backend: str,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize groups ``X`` ([G, n] fp32) with fixed scales; ``backend`` auto|torch|numba.

    ``out``, if given, is a contiguous ``[G, n]`` fp32 tensor that receives the result (and is returned).
    """
    if backend != "torch":
        done = kernels.qdq(X, sc, spec, seed, required=backend == "numba", out=out)
        if done is not None:
            return done
    Y = decode_groups(element_values(X, sc, spec, seed), sc, spec)
    return Y if out is None else out.copy_(Y)


def choose_scales(X: torch.Tensor, spec: QuantSpec, seed: int, backend: str, *,
                  tensor: torch.Tensor | None = None) -> GroupScales:
    """Scales for groups ``X`` ([G, n] fp32) by the spec's scale rule, including clip search.

    ``tensor``: a fixed second-level scale (0-d fp32) to use instead of the one of ``X``, for specs
    with a tensor scale (GPTQ takes it from the whole weight and then chooses one group at a time).
    """
    if tensor is not None and spec.scale.tensor_scale is None:
        raise ValueError(f"a fixed tensor scale was given, but spec {spec} has no tensor scale")
    fast = kernel_scales(X, spec, backend) if tensor is None else None
    if fast is not None:
        return fast
    lo, hi = group_range(X, spec, backend)
    S = tensor_scale(torch.maximum(-lo, hi), spec) if tensor is None else tensor.float().reshape(())
    best = scales_for_range(lo, hi, spec, S)
    clip = spec.scale.clip
    if not isinstance(clip, MSEClip) or X.numel() == 0:
        return best
    best_err = ((qdq_groups(X, best, spec, seed, backend) - X) ** 2).sum(dim=1)
    for ratio in torch.linspace(1.0, clip.min_ratio, clip.steps).tolist()[1:]:
        cand = scales_for_range(lo * ratio, hi * ratio, spec, S)
        err = ((qdq_groups(X, cand, spec, seed, backend) - X) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = GroupScales(
            torch.where(better, cand.scale, best.scale),
            torch.where(better, cand.block, best.block),
            None if best.zero is None else torch.where(better, cand.zero, best.zero),
            S,
            None if best.offset is None else torch.where(better, cand.offset, best.offset),
        )
    return best


def fake_quantize(x: torch.Tensor, spec: QuantSpec | str, *, generator: torch.Generator | None = None,
                  backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize and dequantize ``x`` (any float dtype and shape); returns the same dtype and shape.

    Computation is in fp32. ``generator`` seeds stochastic rounding (torch's default generator when
    None). ``backend``: ``auto`` uses the compiled CPU kernels for large tensors when numba is
    installed, ``torch`` forces the reference, ``numba`` requires the kernels; all are bit-identical.
    ``out``: an optional preallocated result of the shape and dtype of ``x`` (reused buffers avoid
    the cost of fresh memory in loops over many specs); it is returned.
    """
    _check_input(x)
    _check_backend(backend)
    spec = _as_spec(spec)
    grouping = Grouping(tuple(x.shape), spec.granularity)  # validates the shape before any work
    if x.numel() == 0:
        return x.clone() if out is None else out
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out must match x: shape {tuple(x.shape)}, {x.dtype} on {x.device}; got shape "
                         f"{tuple(out.shape)}, {out.dtype} on {out.device}")
    seed = noise.draw_seed(generator) if spec.rounding is Rounding.STOCHASTIC else 0
    X = grouping.to_groups(x.float())
    sc = choose_scales(X, spec, seed, backend)
    direct = out is not None and out.dtype == torch.float32 and out.is_contiguous() and x.is_contiguous()
    if direct:
        out_groups = grouping.to_groups(out)
        direct = out_groups.data_ptr() == out.data_ptr() and out_groups.is_contiguous()  # a view of out
    if direct:
        qdq_groups(X, sc, spec, seed, backend, out=out_groups)
        return out
    y = grouping.from_groups(qdq_groups(X, sc, spec, seed, backend)).to(x.dtype)
    return y if out is None else out.copy_(y)


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes and scales of a quantized tensor.

    ``codes``: int32, the shape of the source, element codes of ``spec.format``.
    ``scales``: fp32 ``[G]`` stored block scales (values of the scale format), in group order.
    ``scale_codes``: int32 ``[G]`` the same scales as codes of the scale format.
    ``zero_points``: fp32 ``[G]`` integer zero points (asymmetric) or None.
    ``tensor_scale``: fp32 0-d second-level scale or None.
    ``offsets``: fp32 ``[G]`` float minima (``asymf``, values of the scale format) or None.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    scale_codes: torch.Tensor
    zero_points: torch.Tensor | None
    tensor_scale: torch.Tensor | None
    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def quantize(x: torch.Tensor, spec: QuantSpec | str, *, generator: torch.Generator | None = None) -> QuantizedTensor:
    """Quantize ``x`` to codes and scales; ``dequantize(quantize(x)) == fake_quantize(x)`` exactly."""
    _check_input(x)
    spec = _as_spec(spec)
    grouping = Grouping(tuple(x.shape), spec.granularity)
    seed = noise.draw_seed(generator) if spec.rounding is Rounding.STOCHASTIC else 0
    X = grouping.to_groups(x.float())
    sc = choose_scales(X, spec, seed, "auto")
    q = element_values(X, sc, spec, seed)
    # A group with a NaN scale decodes to NaN whatever its elements: store code 0 for them.
    bad = ~torch.isfinite(sc.scale)[:, None].expand_as(q)
    code0 = spec.format.decode(torch.zeros(1, dtype=torch.int32, device=q.device))
    codes = spec.format.encode(torch.where(bad, code0, q))  # asymmetric: q holds the integers r
    return _quantized_tensor(grouping.from_groups(codes), sc, spec, x)


def _quantized_tensor(codes: torch.Tensor, sc: GroupScales, spec: QuantSpec,
                      x: torch.Tensor) -> QuantizedTensor:
    """The :class:`QuantizedTensor` of ``x`` from its element codes (shape of ``x``) and group scales."""
    return QuantizedTensor(
        codes=codes.contiguous(),
        scales=sc.block,
        scale_codes=spec.scale.format.encode(sc.block),
        zero_points=sc.zero,
        tensor_scale=sc.tensor,
        spec=spec,
        shape=tuple(x.shape),
        dtype=x.dtype,
        offsets=sc.offset,
    )


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """The fake-quantized tensor (``qt.dtype``, ``qt.shape``) that ``qt`` encodes."""
    grouping = Grouping(qt.shape, qt.spec.granularity)
    q = grouping.to_groups(qt.spec.format.decode(qt.codes))
    scale = qt.scales * qt.tensor_scale if qt.tensor_scale is not None else qt.scales
    sc = GroupScales(scale, qt.scales, qt.zero_points, qt.tensor_scale, qt.offsets)
    return grouping.from_groups(decode_groups(q, sc, qt.spec)).to(qt.dtype)


def _check_decodes(qt: QuantizedTensor, x: torch.Tensor) -> QuantizedTensor:
    y = dequantize(qt).float()
    xf = x.float()
    same = (y == xf) | (torch.isnan(y) & torch.isnan(xf))
    if not bool(same.all()):
        i = int((~same).reshape(-1).nonzero()[0])
        raise ValueError(f"the tensor is not on the grid of {qt.spec}: flat index {i} holds "
                         f"{float(xf.reshape(-1)[i])!r}, the codes decode to {float(y.reshape(-1)[i])!r}")
    return qt


def quantize_with_scales(x: torch.Tensor, spec: QuantSpec | str, scales: GroupScales) -> QuantizedTensor:
    """Codes of ``x`` (any shape) that already lies on the grid of ``spec`` with the given ``scales``.

    ``scales`` are in the group order of ``Grouping(x.shape, spec.granularity)`` (as GPTQ and RTN return
    them). The element value of each entry is rounded to nearest, then the codes are checked to decode
    to ``x`` bit-exactly; a ValueError names the first index that does not (a weight off the grid).
    """
    _check_input(x)
    spec = _as_spec(spec)
    grouping = Grouping(tuple(x.shape), spec.granularity)
    X = grouping.to_groups(x.float())
    if scales.scale.shape != (X.shape[0],):
        raise ValueError(f"{X.shape[0]} groups in a {tuple(x.shape)} tensor under {spec}, "
                         f"but {tuple(scales.scale.shape)} scales")
    if scales.offset is not None:
        qmin = spec.format.qmin  # type: ignore[attr-defined]  (offsets need integer elements)
        y = (X - scales.offset[:, None]) / scales.scale[:, None] + qmin
    elif scales.zero is not None:
        y = X / scales.scale[:, None] + scales.zero[:, None]
    else:
        y = X / scales.scale[:, None]
    q = spec.format.round(torch.nan_to_num(y, nan=0.0), Rounding.NEAREST)
    codes = spec.format.encode(q)
    return _check_decodes(_quantized_tensor(grouping.from_groups(codes), scales, spec, x), x)


def requantize(x: torch.Tensor, spec: QuantSpec | str) -> QuantizedTensor:
    """``quantize(x, spec)`` for an ``x`` that is already fake-quantized, checked to decode to ``x`` exactly.

    Holds when the spec's scale rule finds the same scales again (absmax, no clip search); otherwise
    a ValueError says where it differs (store the scales and use :func:`quantize_with_scales`).
    """
    return _check_decodes(quantize(x, spec), x)
