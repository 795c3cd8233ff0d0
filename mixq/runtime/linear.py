"""Packed linear modules: real low-precision storage and compute on the CPU.

Both modules replace a linear-like layer (``nn.Linear`` or HF ``Conv1D``: ``y = x W^T + b`` with
``W [out, in]``, the ``weight_matrix`` layout) and reproduce its fake-quant ``QuantLinear`` pipeline::

    x ──► Hadamard (optional) ──► [int8 token codes] ──► packed GEMM ──► (+ bias) ──► Q_out

- :class:`PackedLinearW8A8`: integer weight codes of at most 8 bits ``[out, in]`` (int8 storage) with
  per-output-channel fp32 scales, and inputs quantized per token to symmetric integers of at most 8 bits
  (int8, int7, int6, ...) with exactly mixq's scales and codes. The exact integer accumulator
  ``acc = xq @ wq^T`` comes from one of the backends below (all give the same value bit for bit), then
  ``y = float(acc) * s_x * s_w``:

  - ``onednn``: oneDNN's u8 x s8 linear on the weight prepacked once (``tiles.OneDNNWeight``), for
    7-bit inputs with int8 weights, or 8-bit inputs with weight codes of at most 64 in magnitude
    (``int7`` weights): wider pairs saturate its int16 pair sums on CPUs without VNNI (see
    ``tiles.onednn_fits``); K-chunks keep ``|acc| <= 2**24`` so that its fp32 output is exact. ~2x
    fp32 BLAS on AVX2 at prefill sizes.
  - ``fp32_exact``: fp32 BLAS over K-chunks of 1024 whose integer partial sums stay below 2**24.
  - ``int_mm``: ``torch._int_mm`` (a plain loop on CPUs without VNNI: slow, kept as a reference).
  - ``auto`` (default): ``onednn`` when the codes fit that bound and oneDNN passes its self-test
    (``tiles.onednn_available``), else ``fp32_exact``.
- :class:`PackedLinearWeightOnly`: 1..8-bit codes kept densely packed per row (``tiles.pack_rows``),
  with per-channel / per-group / per-tensor scales (sym, asym zero points, asymf offsets, tensor
  scale). ``forward`` decodes ``tile_rows`` output rows at a time to fp32 values identical to
  ``dequantize(codes)`` and multiplies (BLAS); the whole fp32 weight never exists. For up to
  ``GEMV_ROWS`` input rows without autograd (decode), widths dividing 8 use the fused numba kernels
  of ``_numba_gemv`` (the same weight values, decoded row by row inside the dot product).

The output quantizer of K/V projections (KV-cache emulation) stays a fake-quantizer: it is applied to
the fp32 output exactly as ``QuantLinear`` does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mixq.algorithms.hadamard import block_hadamard
from mixq.formats import IntFormat, Rounding
from mixq.quant import fake_quantize
from mixq.quant.core import choose_scales, element_values
from mixq.quant.granularity import PerChannel, PerGroup, PerTensor, PerToken
from mixq.quant.spec import FP32, AbsMaxClip, QuantSpec
from mixq.runtime import tiles

if TYPE_CHECKING:  # the export layer imports nothing from here; only its data class is read
    from mixq.export.layers import QuantizedLayer

GEMV_ROWS = 8  # up to this many input rows (decode), the fused numba kernel; more rows: tiles + BLAS
BACKENDS = ("auto", "onednn", *tiles.INT_BACKENDS)


def _is_int_codes(fmt) -> bool:
    """Signed integers of at most 8 bits without a fraction (held exactly in int8)."""
    return isinstance(fmt, IntFormat) and fmt.bit_width <= 8 and fmt.is_signed and not fmt.fraction_bits


def _plain_scale(spec: QuantSpec) -> bool:
    s = spec.scale
    return not s.asymmetric and s.tensor_scale is None and s.format == FP32


def _w8a8_reason(layer: QuantizedLayer) -> str | None:
    w, x = layer.weight, layer.inputs
    if w is None or x is None:
        return "W8A8 needs quantized weights and inputs"
    if not (_is_int_codes(w.spec.format) and _plain_scale(w.spec) and w.spec.granularity == PerChannel(0)):
        return f"W8A8 needs int8:channel weights (or narrower signed ints; symmetric, fp32 scales), got {w.spec}"
    if not (_is_int_codes(x.format) and _plain_scale(x) and isinstance(x.granularity, PerToken)):
        return f"W8A8 needs int8:token inputs (or narrower signed ints; symmetric, fp32 scales), got {x}"
    if not isinstance(x.scale.clip, AbsMaxClip) or x.rounding is not Rounding.NEAREST:
        return f"W8A8 inputs must use absmax scales and nearest rounding, got {x}"
    if layer.static_range is not None:
        return "static input ranges are not supported by the W8A8 kernel"
    return None


def _weight_only_reason(layer: QuantizedLayer) -> str | None:
    w = layer.weight
    if w is None:
        return "no quantized weight"
    if layer.inputs is not None:
        return f"weight-only packing needs float inputs, got an input quantizer {layer.inputs}"
    fmt, gran = w.spec.format, w.spec.granularity
    if fmt.num_codes > 256 or fmt.num_codes & (fmt.num_codes - 1):
        return f"weight-only packing needs 2..256 codes (a power of two), {fmt.name} has {fmt.num_codes}"
    if len(w.shape) != 2:
        return f"weight-only packing needs a [out, in] matrix, got shape {w.shape}"
    if not (isinstance(gran, PerTensor) or gran == PerChannel(0)
            or (isinstance(gran, PerGroup) and gran.axis in (-1, 1))):
        return f"weight-only packing supports tensor, channel and input-dim groups, got {gran.token()}"
    return None


def supports(layer: QuantizedLayer) -> str | None:
    """``"w8a8"`` or ``"weight_only"``: the packed module that computes ``layer`` exactly, or None."""
    if _w8a8_reason(layer) is None:
        return "w8a8"
    if _weight_only_reason(layer) is None:
        return "weight_only"
    return None


def why_not(layer: QuantizedLayer) -> str:
    """Why no packed module fits ``layer`` (the reasons of both modules)."""
    return f"{_w8a8_reason(layer)}; {_weight_only_reason(layer)}"


class _Packed(nn.Module):
    """Shared input rotation and output (KV) quantizer of the packed modules."""

    def __init__(self, in_features: int, out_features: int, layer: QuantizedLayer,
                 bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.hadamard = int(layer.hadamard)
        self.register_buffer("signs", None if layer.signs is None else layer.signs.float().clone())
        self.outputs = layer.outputs
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def _prepare(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got {tuple(x.shape)}")
        return block_hadamard(x, self.hadamard, self.signs) if self.hadamard else x

    def _finish(self, y: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*shape[:-1], self.out_features).to(dtype)
        return fake_quantize(y, self.outputs) if self.outputs is not None else y


class PackedLinearW8A8(_Packed):
    """Integer weights (per output channel, <= 8 bits) x per-token integer inputs (<= 8 bits), exact
    integer accumulation.

    Buffers: ``weight_codes`` int8 ``[out, in]`` (None when oneDNN holds the weight alone, see below),
    ``weight_scale`` fp32 ``[out]``, ``bias`` fp32 ``[out]`` or None. ``backend``: ``auto``, ``onednn``,
    ``int_mm`` or ``fp32_exact`` (module docstring); :meth:`route` gives the one used for M rows.

    With oneDNN the weight is prepacked once into ``self.onednn`` (``tiles.OneDNNWeight``: about
    ``in * out`` bytes, one per weight, outside torch's storages; :meth:`opaque_bytes` reports it and
    ``packed_bytes`` counts it). The plain int8 codes would duplicate it, so they are dropped: every M
    runs on oneDNN, the codes are rebuilt exactly from the prepacked copy by :meth:`int_weight` and
    written to / read from the ``state_dict`` as ``weight_codes``. ``onednn_min_rows > 1`` keeps the
    codes too (2 bytes per weight) and sends fewer rows to ``fp32_exact``, which is ~20 % faster than
    oneDNN for a single row (decode) on an AVX2 machine without VNNI.
    """

    def __init__(self, codes: Tensor, scale: Tensor, inputs: QuantSpec, layer: QuantizedLayer,
                 bias: Tensor | None, backend: str = "auto", onednn_min_rows: int = 1) -> None:
        super().__init__(codes.shape[1], codes.shape[0], layer, bias)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.inputs = inputs
        self._qmin, self._qmax = float(inputs.format.qmin), float(inputs.format.max)
        codes = codes.to(torch.int8).contiguous()  # [out, in]
        self._zero_point = -int(inputs.format.qmin)  # u8 activations = codes - qmin
        w_absmax = int(codes.to(torch.int16).abs().max()) if codes.numel() else 0  # int16: |-128| fits
        fits = tiles.onednn_fits(int(inputs.format.qmin), int(inputs.format.max), w_absmax)
        if backend == "onednn" and not fits:
            raise ValueError(f"the onednn backend needs 7-bit inputs, or 8-bit inputs with weight codes of at "
                             f"most 64 in magnitude (7-bit weights); {inputs} with weight codes up to {w_absmax} "
                             "would saturate its int16 pair sums (use auto, fp32_exact or int_mm)")
        if backend == "onednn" and not tiles.onednn_available():
            raise RuntimeError("oneDNN's int8 linear is not available or failed its exactness self-test")
        self.onednn_min_rows = max(1, int(onednn_min_rows))
        self.onednn = None
        self._w_absmax = max(1, w_absmax)
        x_absmax = int(max(-inputs.format.qmin, inputs.format.max))
        self._onednn_chunk = tiles.onednn_chunk(x_absmax, self._w_absmax)  # 2048 for int7 x int8, int8 x int7
        if backend in ("auto", "onednn") and fits and tiles.onednn_available():
            self.onednn = tiles.OneDNNWeight(codes, self._onednn_chunk)
        keep = self.onednn is None or self.onednn_min_rows > 1
        self.register_buffer("weight_codes", codes if keep else None)
        self.register_buffer("weight_scale", scale.float().contiguous())

    @classmethod
    def from_layer(cls, layer: QuantizedLayer, bias: Tensor | None, backend: str = "auto",
                   onednn_min_rows: int = 1) -> "PackedLinearW8A8":
        reason = _w8a8_reason(layer)
        if reason is not None:
            raise ValueError(f"{layer.name}: {reason}")
        w = layer.weight
        values = w.spec.format.decode(w.codes)  # [out, in] fp32 integers in [-128, 127]
        return cls(values.to(torch.int8), w.scales, layer.inputs, layer, bias, backend, onednn_min_rows)

    def route(self, rows: int) -> str:
        """The backend that computes ``rows`` input rows: ``onednn``, ``fp32_exact`` or ``int_mm``."""
        if self.onednn is not None and (rows >= self.onednn_min_rows or self.weight_codes is None):
            return "onednn"
        return "fp32_exact" if self.backend in ("auto", "onednn") else self.backend

    def int_weight(self) -> Tensor:
        """The int8 weight codes ``[out, in]`` (the buffer, or rebuilt exactly from oneDNN's copy)."""
        return self.weight_codes if self.weight_codes is not None else self.onednn.codes()

    def opaque_bytes(self) -> int:
        """Bytes held outside torch storages (oneDNN's prepacked weight), 0 without it."""
        return self.onednn.nbytes() if self.onednn is not None else 0

    def int_accumulator(self, xq: Tensor, rows_backend: str | None = None) -> Tensor:
        """``xq [M, in]`` int8 codes -> the exact int32 accumulator ``[M, out]`` (by :meth:`route`'s
        backend for M rows, or ``rows_backend``)."""
        route = rows_backend or self.route(xq.shape[0])
        if route == "onednn":
            if self.onednn is None or int(xq.min()) < -self._zero_point or \
                    not tiles.onednn_fits(-self._zero_point, int(xq.max()), self._w_absmax):
                raise ValueError("oneDNN holds no weight here, or the codes would saturate its pair sums")
            return self.onednn.matmul_u8(tiles.u8_from_codes(xq, self._zero_point), self._zero_point)
        return tiles.int_matmul(xq, self.int_weight(), route)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_codes is None:
            destination[prefix + "weight_codes"] = self.onednn.codes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "weight_codes"
        if self.weight_codes is None and key in state_dict:
            self.onednn = tiles.OneDNNWeight(state_dict[key].to(torch.int8).contiguous(), self._onednn_chunk)
            state_dict = {k: v for k, v in state_dict.items() if k != key}  # not a buffer here
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [M, in]`` -> (int8 codes ``[M, in]``, fp32 scales ``[M]``): mixq's per-token codes, so that
        ``codes * scales[:, None] == fake_quantize(x, inputs)`` bit for bit.

        The same arithmetic as mixq's absmax rule for a symmetric int with fp32 scales (``amax / qmax``,
        a zero scale becomes 1, ``round_half_even(x / s)``), in three tensor ops; rows holding NaN or inf
        take mixq's reference path (:meth:`quantize_input_reference`)."""
        q, s = self._quantize(x.float())
        return q.to(torch.int8), s

    def _quantize(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`quantize_input` with the codes left as fp32 integers ``[M, in]``."""
        s = X.abs().amax(dim=1) / self._qmax  # [M]
        if not torch.isfinite(s).all():
            q, s = self.quantize_input_reference(X)
            return q.float(), s
        s = torch.where(s > 0, s, torch.ones_like(s))
        return (X / s[:, None]).round_().clamp_(self._qmin, self._qmax), s  # [M, in] fp32 integers

    def quantize_input_reference(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`quantize_input` by mixq's own scale and rounding functions (the oracle)."""
        X = x.float()
        sc = choose_scales(X, self.inputs, 0, "auto")  # [M] one scale per row (token)
        q = element_values(X, sc, self.inputs, 0)  # [M, in] fp32 integers
        return q.to(torch.int8), sc.scale

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = tuple(x.shape), x.dtype
        x2 = self._prepare(x).reshape(-1, self.in_features)  # [M, in]
        q, sx = self._quantize(x2.float())  # [M, in] fp32 integer codes, [M]
        route = self.route(q.shape[0])
        if route == "onednn":  # fp32 [M, out]: float(acc), exact integers per chunk
            acc = self.onednn.matmul_u8(q.add_(self._zero_point).to(torch.uint8), self._zero_point, torch.float32)
        else:
            acc = tiles.int_matmul(q.to(torch.int8), self.int_weight(), route).float()  # [M, out]
        y = acc.mul_(sx[:, None]).mul_(self.weight_scale[None, :])  # (acc * s_x) * s_w, in place
        return self._finish(y, shape, dtype)

    def extra_repr(self) -> str:
        held = "onednn" if self.onednn is not None else "int8 codes"
        return (f"in={self.in_features}, out={self.out_features}, inputs={self.inputs}, backend={self.backend}, "
                f"weight held as {held}")


def _group_layout(layer: QuantizedLayer) -> int:
    """Group size along the input dim of the weight's grouping (``in`` for channel, ``out*in`` tensor)."""
    out, inn = layer.weight.shape
    gran = layer.weight.spec.granularity
    if isinstance(gran, PerGroup):
        return gran.size
    return inn if isinstance(gran, PerChannel) else out * inn


class PackedLinearWeightOnly(_Packed):
    """Densely packed 1..8-bit weight codes, decoded ``tile_rows`` rows at a time.

    Buffers: ``packed`` uint8 ``[out, B]`` (``tiles.pack_rows``), ``scale`` fp32 ``[G]`` (block scale x
    tensor scale, as ``dequantize`` forms it), ``zero`` fp32 ``[G]`` or None, ``offset`` fp32 ``[G]`` or
    None, ``lut`` fp32 ``[num_codes]`` (the format's values of each code), ``byte_lut`` fp32
    ``[256, 8 / bits]`` when the width divides 8 (values of each code of a byte).
    """

    def __init__(self, layer: QuantizedLayer, bias: Tensor | None, tile_rows: int = 256,
                 kernel: bool = True) -> None:
        reason = _weight_only_reason(layer)
        if reason is not None:
            raise ValueError(f"{layer.name}: {reason}")
        w = layer.weight
        out, inn = w.shape
        super().__init__(inn, out, layer, bias)
        fmt, rule = w.spec.format, w.spec.scale
        self.bits = int(math.log2(fmt.num_codes))
        self.tile_rows = int(tile_rows)
        self.kernel = kernel  # use the fused numba kernel for <= GEMV_ROWS input rows when available
        self.group = _group_layout(layer)
        self.spec = w.spec
        self.register_buffer("packed", tiles.pack_rows(w.codes.reshape(out, inn), self.bits))
        scale = w.scales * w.tensor_scale if w.tensor_scale is not None else w.scales
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", None if w.zero_points is None else w.zero_points.float().contiguous())
        self.register_buffer("offset", None if w.offsets is None else w.offsets.float().contiguous())
        self.qmin = float(fmt.qmin) if rule.offset else 0.0
        lut = fmt.decode(torch.arange(fmt.num_codes, dtype=torch.int32)).float()  # [num_codes]
        self.register_buffer("lut", lut)
        if 8 % self.bits == 0:
            per = 8 // self.bits
            byte = torch.arange(256, dtype=torch.int64)[:, None] >> (torch.arange(per) * self.bits)
            self.register_buffer("byte_lut", lut[byte & (fmt.num_codes - 1)].contiguous())  # [256, per]
        else:
            self.register_buffer("byte_lut", None)

    @classmethod
    def from_layer(cls, layer: QuantizedLayer, bias: Tensor | None, tile_rows: int = 256,
                   kernel: bool = True) -> "PackedLinearWeightOnly":
        return cls(layer, bias, tile_rows, kernel)

    def _values(self, r0: int, r1: int) -> Tensor:
        """Element values (fp32 ``[r1 - r0, in]``) of output rows ``r0:r1``."""
        data = self.packed[r0:r1]  # [T, B] uint8
        if self.byte_lut is not None:
            v = nn.functional.embedding(data.to(torch.int32), self.byte_lut)  # [T, B, per]
            return v.reshape(r1 - r0, -1)[:, : self.in_features]
        return self.lut[tiles.unpack_rows(data, self.bits, self.in_features)]

    def weight_tile(self, r0: int, r1: int) -> Tensor:
        """The fp32 weight rows ``r0:r1`` (``[T, in]``), bit-identical to those of ``dequantize``."""
        q = self._values(r0, r1)
        T, g = r1 - r0, self.group
        if self._tensor_wide:  # one group for the whole matrix
            sel = slice(0, 1)
            shape = (1, T * self.in_features)
        else:
            per_row = self.in_features // g
            sel = slice(r0 * per_row, r1 * per_row)
            shape = (T * per_row, g)
        Q = q.reshape(shape)  # [G_tile, g]
        s = self.scale[sel][:, None]
        if self.offset is not None:
            W = (Q - self.qmin) * s + self.offset[sel][:, None]
        elif self.zero is not None:
            W = (Q - self.zero[sel][:, None]) * s
        else:
            W = Q * s
        return W.reshape(T, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        shape, dtype = tuple(x.shape), x.dtype
        x2 = self._prepare(x).reshape(-1, self.in_features).float()  # [M, in]
        y = x2.new_empty(x2.shape[0], self.out_features)
        if self._use_kernel(x2):
            self._kernel_matmul(x2.contiguous(), y)
            return self._finish(y, shape, dtype)
        for r0 in range(0, self.out_features, self.tile_rows):
            r1 = min(r0 + self.tile_rows, self.out_features)
            y[:, r0:r1] = x2 @ self.weight_tile(r0, r1).t()  # [M, T]
        return self._finish(y, shape, dtype)

    def _use_kernel(self, x2: Tensor) -> bool:
        aligned = self.in_features % 8 == 0 and (self.group % 8 == 0 or self._tensor_wide)
        return (self.kernel and aligned and x2.shape[0] <= GEMV_ROWS and self.byte_lut is not None
                and x2.device.type == "cpu" and not torch.is_grad_enabled()
                and tiles.gemv_kernels() is not None)

    @property
    def _tensor_wide(self) -> bool:
        return self.group >= self.in_features * self.out_features

    def _kernel_matmul(self, x2: Tensor, y: Tensor) -> None:
        """``y [M, out] = x2 [M, in] @ W^T`` by the fused kernel (rows decoded exactly as ``weight_tile``)."""
        mode = 2 if self.offset is not None else 1 if self.zero is not None else 0
        empty = torch.zeros(1)
        tensor_wide = self._tensor_wide
        group = self.in_features if tensor_wide else self.group
        zero = (self.zero if self.zero is not None else empty).numpy()
        offset = (self.offset if self.offset is not None else empty).numpy()
        lut = self.byte_lut.reshape(-1).numpy()  # [256 * per]
        kernels = tiles.gemv_kernels()
        if x2.shape[0] == 1 and self.bits == 4:  # decode of 4-bit weights: no row buffer at all
            kernels.gemv1_nibbles(x2.numpy(), self.packed.numpy(), lut, self.scale.numpy(), zero, offset,
                                  self.qmin, mode, group, tensor_wide, y.numpy())
            return
        kernels.gemv(x2.numpy(), self.packed.numpy(), lut, self.byte_lut.shape[1], self.scale.numpy(), zero,
                     offset, self.qmin, mode, group, tensor_wide, y.numpy())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, weights={self.spec}, bits={self.bits}, "
                f"tile_rows={self.tile_rows}")
