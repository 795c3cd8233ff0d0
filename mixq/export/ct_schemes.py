"""Which mixq quantizers compressed-tensors can express, and as what.

``ct_scheme(layer)`` maps one :class:`QuantizedLayer` to a compressed-tensors scheme: the
``weights`` and ``input_activations`` argument dicts (``QuantizationArgs`` fields) and the
checkpoint ``format``, or returns the reason it cannot. Conventions checked against the
compressed-tensors 0.20 source:

* integers: compressed-tensors decodes ``(q - zp) * scale`` with ``q, zp`` in the signed range
  ``[-2**(b-1), 2**(b-1) - 1]``; mixq's ``(r - z) * s`` is the same with ``r, z`` shifted by
  ``2**(b-1)`` for unsigned formats (0 for signed ones). Scales are stored (fp32), so mixq's ``amax / qmax``
  rule needs no translation; a mixq tensor scale is folded into the stored fp32 scale
  (``block * S``, the very product mixq decodes with).
* fp8 (E4M3 "fn"): ``weight`` is stored as ``float8_e4m3fn``, decoded ``w.float() * scale``.
* NVFP4: ``weight_scale`` in E4M3 and ``weight_global_scale = 1 / S``; compressed-tensors decodes
  ``q * (scale / global_scale)`` and rounds the weight to bf16, so a reload by transformers is close
  but not bit-exact (``exact`` False); mixq's own reader uses the exact ``S`` of the sidecar.
* MXFP4: E8M0 exponents as uint8 (bias 127), 32-element groups.
* Inputs: dynamic per-token or per-tensor and static per-tensor, symmetric, absmax, fp32 scales.
  compressed-tensors' dynamic scale is ``amax / ((qmax - qmin) / 2)``: ``amax / 448`` for fp8 (mixq's
  rule, exact) but ``amax / 127.5`` for int8, where mixq (and vLLM's kernels) use ``amax / 127``;
  such schemes are written with ``exact`` False.

Tensor layouts (compressed-tensors 0.20), for a ``[out, in]`` weight with ``G`` scales:

* ``pack-quantized`` (2-7 bits): ``weight_packed`` int32 ``[out, ceil(in * b / 32)]`` (element ``i`` of a row
  at bits ``i*b .. i*b+b-1`` of the row's little-endian bitstream, stored as ``q + 2**(b-1)``),
  ``weight_shape`` int64 ``[2]``, ``weight_scale`` fp32, asymmetric: ``weight_zero_point`` packed the same
  way along the output axis (``[ceil(out * b / 32), G/out]``) for channel/group, int8 for tensor.
* ``naive-/int-/float-quantized`` (8 bits): ``weight`` int8 or float8_e4m3fn ``[out, in]``, ``weight_scale``
  fp32, asymmetric: ``weight_zero_point`` int8.
* ``nvfp4-pack-quantized``: ``weight_packed`` uint8 ``[out, in/2]`` (low nibble first; sign bit 3,
  magnitude index into 0, .5, 1, 1.5, 2, 3, 4, 6), ``weight_scale`` float8_e4m3fn ``[out, in/16]``,
  ``weight_global_scale`` fp32 ``[1]`` = ``1 / S``.
* ``mxfp4-pack-quantized``: as NVFP4 with ``weight_scale`` uint8 E8M0 exponents ``[out, in/32]``.
* static inputs: ``input_scale`` fp32 ``[1]``.

Scale shapes: tensor ``[1]``, channel ``[out, 1]``, group ``[out, in/g]``, block ``[out/r, in/c]``; all in
mixq's group order once flattened.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mixq.export.layers import ExportError, QuantizedLayer
from mixq.export.pack import pack_bits, unpack_bits
from mixq.formats import ExponentFormat, FloatFormat, IntFormat
from mixq.formats.base import Rounding
from mixq.quant import QuantizedTensor, QuantSpec
from mixq.quant.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken
from mixq.quant.scale import scales_for_range, tensor_scale
from mixq.quant.spec import FP32, AbsMaxClip

E4M3 = FloatFormat(4, 3, specials="fn")
E2M1 = FloatFormat(2, 1, specials="none")

PACKED = "pack-quantized"
NAIVE = "naive-quantized"
INT = "int-quantized"
FLOAT = "float-quantized"
NVFP4 = "nvfp4-pack-quantized"
MXFP4 = "mxfp4-pack-quantized"


def _strategy(spec: QuantSpec, shape: tuple[int, ...], allow_block: bool) -> dict[str, Any] | str:
    """The strategy fields of a ``[out, in]`` weight's granularity, or why there is none."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return {"strategy": "tensor"}
    if isinstance(g, PerChannel):
        if g.axis % 2 != 0:
            return f"per-input-channel scales ({g.token()}) have no compressed-tensors strategy"
        return {"strategy": "channel"}
    if isinstance(g, PerGroup):
        if g.axis % 2 != 1:
            return f"groups along the output axis ({g.token()}) have no compressed-tensors strategy"
        return {"strategy": "group", "group_size": g.size}
    if isinstance(g, PerBlock):
        if not allow_block:
            return f"2-D blocks ({g.token()}) are only written for 8-bit (unpacked) weights"
        return {"strategy": "block", "block_structure": [g.rows, g.cols]}
    return f"granularity {g.token()} has no compressed-tensors strategy for weights"


def _int_weights(spec: QuantSpec, shape: tuple[int, ...]) -> dict[str, Any] | str:
    fmt = spec.format
    assert isinstance(fmt, IntFormat)
    b = fmt.bit_width
    if not 2 <= b <= 8:
        return f"{fmt.name}: compressed-tensors packs 2- to 8-bit integers here, not {b}-bit"
    if fmt.fraction_bits:
        return f"{fmt.name}: fixed-point integers (fraction bits) are not expressible"
    if spec.scale.offset:
        return "asymf (a float minimum per group) is not expressible; compressed-tensors has integer zero points"
    if not fmt.is_signed and not spec.scale.asymmetric:
        return f"{fmt.name}: unsigned codes without a zero point are not expressible"
    strat = _strategy(spec, shape, allow_block=b == 8)
    if isinstance(strat, str):
        return strat
    return {"num_bits": b, "type": "int", "symmetric": not spec.scale.asymmetric, "dynamic": False, **strat}


def weight_args(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[dict[str, Any], str, bool] | str:
    """(QuantizationArgs fields, weight-only format, exact in transformers) of a weight spec, or a reason."""
    fmt = spec.format
    if isinstance(fmt, IntFormat):
        args = _int_weights(spec, shape)
        if isinstance(args, str):
            return args
        return args, (PACKED if args["num_bits"] < 8 else NAIVE), True
    if fmt == E4M3:
        strat = _strategy(spec, shape, allow_block=True)
        if isinstance(strat, str):
            return strat
        return {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, **strat}, NAIVE, True
    if fmt == E2M1:
        g, rule = spec.granularity, spec.scale
        if not isinstance(g, PerGroup) or g.axis % 2 != 1:
            return "fp4_e2m1 is expressible only as NVFP4 (g16) or MXFP4 (g32) groups along the input axis"
        if g.size == 16 and rule.format == E4M3 and rule.tensor_scale == FP32 and not rule.asymmetric:
            return ({"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False,
                     "strategy": "tensor_group", "group_size": 16}, NVFP4, False)
        if g.size == 32 and isinstance(rule.format, ExponentFormat) and rule.format.bits == 8 \
                and rule.tensor_scale is None and not rule.asymmetric:
            return ({"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False, "strategy": "group",
                     "group_size": 32, "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}, MXFP4, True)
        return (f"fp4_e2m1 with {g.token()} and {rule.format.name} scales is neither NVFP4 "
                "(g16, e4m3 scales, fp32 tensor scale) nor MXFP4 (g32, e8m0 scales)")
    return f"element format {fmt.name} has no compressed-tensors type (int2-8, fp8_e4m3, nvfp4, mxfp4 only)"


def input_args(spec: QuantSpec, static: bool) -> tuple[dict[str, Any], bool] | str:
    """(QuantizationArgs fields, exact in transformers) of an input quantizer, or a reason."""
    fmt, rule = spec.format, spec.scale
    if rule.asymmetric:
        return "asymmetric input quantization is not expressible exactly (compressed-tensors adds the zero point before rounding)"
    if not isinstance(rule.clip, AbsMaxClip):
        return f"input clipping {rule.clip.token()} is not expressible (compressed-tensors uses min-max)"
    if rule.format != FP32 or rule.tensor_scale is not None:
        return f"input scales in {rule.format.name} are not expressible (fp32 scales only)"
    if spec.rounding is not Rounding.NEAREST:
        return "input rounding other than round-to-nearest-even is not expressible"
    if fmt == E4M3:
        base, exact_dynamic = {"num_bits": 8, "type": "float", "symmetric": True}, True
    elif isinstance(fmt, IntFormat) and fmt.bit_width == 8 and fmt.is_signed and not fmt.narrow \
            and not fmt.fraction_bits:
        base, exact_dynamic = {"num_bits": 8, "type": "int", "symmetric": True}, False
    else:
        return f"input format {fmt.name} is not expressible (int8 and fp8_e4m3 only)"
    g = spec.granularity
    if static:
        return {**base, "strategy": "tensor", "dynamic": False}, True
    if isinstance(g, PerToken):
        return {**base, "strategy": "token", "dynamic": True}, exact_dynamic
    if isinstance(g, PerTensor):
        return {**base, "strategy": "tensor", "dynamic": True}, exact_dynamic
    return f"dynamic input granularity {g.token()} is not expressible (token or tensor only)"


def ct_scheme(layer: QuantizedLayer) -> dict[str, Any] | str:
    """The compressed-tensors scheme of ``layer`` or the reason it cannot be expressed.

    Returns ``{"weights": dict | None, "input_activations": dict | None, "format": str, "exact": bool}``:
    the first three go to ``config.json``; ``exact`` says whether transformers' reload decodes to
    exactly mixq's fake-quant numerics (see the module docstring for the cases that do not).
    """
    if layer.hadamard:
        return f"an online Hadamard rotation (block {layer.hadamard}) is not expressible"
    if layer.outputs is not None:
        return f"output (KV-cache) quantization on a projection ({layer.outputs}) is not expressible"
    weights, fmt, exact = None, None, True
    if layer.weight is not None:
        w = weight_args(layer.weight.spec, tuple(layer.weight.shape))
        if isinstance(w, str):
            return w
        if len(layer.weight.shape) != 2:
            return f"weights of shape {tuple(layer.weight.shape)} are not a matrix"
        weights, fmt, exact = w
    inputs = None
    if layer.inputs is not None:
        if layer.weight is None:
            return "input quantization without weight quantization is not written"
        a = input_args(layer.inputs, layer.static_range is not None)
        if isinstance(a, str):
            return a
        inputs, a_exact = a
        exact = exact and a_exact
        if fmt in (NVFP4, MXFP4):
            return "fp4 weights with int8/fp8 input quantization are not written"
        if fmt == NAIVE:
            fmt = FLOAT if weights["type"] == "float" else INT  # type: ignore[index]
        elif fmt == PACKED and inputs["type"] == "float":
            return "packed int weights with fp8 inputs have no compressed-tensors format"
    if weights is None:
        return "layer has nothing compressed-tensors can store"
    return {"weights": weights, "input_activations": inputs, "format": fmt, "exact": exact}


# --- tensor layouts ---------------------------------------------------------------------------

FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
PARAM_NAMES = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
               "weight_global_scale", "input_scale")


def pack_int32(u: Tensor, bits: int) -> Tensor:
    """Unsigned ``u`` ([rows, cols] ints in ``[0, 2**bits)``) -> int32 ``[rows, ceil(cols*bits/32)]``.

    Each row is its own little-endian bitstream (:func:`mixq.export.pack.pack_bits`), padded with zero
    bits to whole int32 words.
    """
    rows, cols = u.shape
    words = -(-cols * bits // 32)
    if (words * 32) % bits == 0:  # rows pad with whole zero codes: the tensor is one continuous stream
        padded = torch.nn.functional.pad(u.to(torch.int64), (0, words * 32 // bits - cols))
        stream = pack_bits(padded, bits)
    else:
        stream = torch.cat([torch.nn.functional.pad(pack_bits(row, bits), (0, words * 4 - -(-cols * bits // 8)))
                            for row in u.to(torch.int64)]) if rows else torch.zeros(0, dtype=torch.uint8)
    return stream.view(torch.int32).reshape(rows, words).clone()


def unpack_int32(w: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_int32`: int32 ``[rows, words]`` -> int64 ``[rows, cols]`` unsigned values."""
    rows, words = w.shape
    raw = w.to(torch.int32).contiguous().view(torch.uint8).reshape(rows, words * 4)
    if (words * 32) % bits == 0:
        per_row = words * 32 // bits
        codes = unpack_bits(raw.reshape(-1), bits, rows * per_row).reshape(rows, per_row)[:, :cols]
    else:
        nbytes = -(-cols * bits // 8)
        codes = torch.stack([unpack_bits(row[:nbytes], bits, cols) for row in raw]) if rows else \
            torch.zeros(0, cols, dtype=torch.int32)
    return codes.to(torch.int64)


def _scale_shape(args: dict[str, Any], shape: tuple[int, int]) -> tuple[int, ...]:
    out, inp = shape
    strategy = args["strategy"]
    if strategy == "tensor":
        return (1,)
    if strategy == "channel":
        return (out, 1)
    if strategy in ("group", "tensor_group"):
        return (out, inp // args["group_size"])
    r, c = args["block_structure"]
    return (out // r, inp // c)


def _offset(fmt: IntFormat) -> int:
    """What to subtract from mixq's integers to get compressed-tensors' signed ones."""
    return 0 if fmt.is_signed else 1 << (fmt.bit_width - 1)


def _fp4_nibbles(values: Tensor) -> Tensor:
    mag = torch.searchsorted(FP4_MAGNITUDES, values.abs().contiguous())
    return (mag | (torch.signbit(values).to(torch.int64) << 3)).to(torch.uint8)


def input_scale(spec: QuantSpec, lo: Tensor, hi: Tensor) -> Tensor:
    """The fp32 ``[1]`` scale mixq's static input quantizer uses for the per-channel range ``lo, hi``."""
    lo, hi = lo.min().reshape(1).float(), hi.max().reshape(1).float()
    if not spec.scale.asymmetric:
        hi = torch.maximum(-lo, hi)
    S = tensor_scale(torch.maximum(-lo, hi), spec)
    return scales_for_range(lo, hi, spec, S).scale.reshape(1).contiguous()


def encode_layer(layer: QuantizedLayer, scheme: dict[str, Any]) -> dict[str, Tensor]:
    """The layer's tensors, by local compressed-tensors name (``weight_packed``, ``input_scale`` ...)."""
    qt, args, fmt = layer.weight, scheme["weights"], scheme["format"]
    assert qt is not None
    spec = qt.spec
    shape = (int(qt.shape[0]), int(qt.shape[1]))
    sshape = _scale_shape(args, shape)
    values = spec.format.decode(qt.codes).reshape(shape)  # element values (asymmetric: the integers r)
    out: dict[str, Tensor] = {}
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        nib = _fp4_nibbles(values).reshape(shape[0], -1, 2)
        out["weight_packed"] = (nib[..., 0] | (nib[..., 1] << 4)).contiguous()
        block = qt.scales.reshape(sshape)
        if fmt == "mxfp4-pack-quantized":
            _, exp = torch.frexp(block.double())
            out["weight_scale"] = (exp - 1 + 127).to(torch.uint8).contiguous()
        else:
            out["weight_scale"] = block.to(torch.float8_e4m3fn).contiguous()
            out["weight_global_scale"] = (1.0 / qt.tensor_scale.float()).reshape(1).contiguous()
    else:
        scale = qt.scales * qt.tensor_scale if qt.tensor_scale is not None else qt.scales
        out["weight_scale"] = scale.float().reshape(sshape).contiguous()
        if isinstance(spec.format, IntFormat):
            b, off = spec.format.bit_width, _offset(spec.format)
            q = values.to(torch.int64) - off
            if b < 8:
                out["weight_packed"] = pack_int32(q + (1 << (b - 1)), b)
                out["weight_shape"] = torch.tensor(shape, dtype=torch.int64)
            else:
                out["weight"] = q.to(torch.int8).contiguous()
            if spec.scale.asymmetric:
                zp = qt.zero_points.to(torch.int64).reshape(sshape) - off
                if b < 8 and args["strategy"] in ("group", "channel"):
                    out["weight_zero_point"] = pack_int32((zp + (1 << (b - 1))).T, b).T.contiguous()
                else:
                    out["weight_zero_point"] = zp.to(torch.int8).contiguous()
        else:
            out["weight"] = values.to(torch.float8_e4m3fn).contiguous()
    if layer.static_range is not None:
        out["input_scale"] = input_scale(layer.inputs, *layer.static_range)
    return out


def decode_layer(name: str, parts: Mapping[str, Tensor], spec: QuantSpec, scheme: dict[str, Any],
                 extra: Mapping[str, Tensor]) -> QuantizedTensor:
    """mixq codes of a layer's weight from its compressed-tensors ``parts`` (local names).

    ``extra``: the mixq sidecar tensors of this layer (``tensor_scale`` 0-d, ``block_scale`` [G]) for
    specs with a tensor scale, whose split compressed-tensors does not keep exactly.
    """
    fmt = scheme["format"]
    try:
        if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
            packed = parts["weight_packed"]
            nib = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1).to(torch.int64)
            values = FP4_MAGNITUDES[nib & 7] * torch.where(nib >= 8, -1.0, 1.0)
            if fmt == "mxfp4-pack-quantized":
                exp = parts["weight_scale"].to(torch.int32) - 127
                block = torch.ldexp(torch.ones(exp.shape), exp).float()
            else:
                block = parts["weight_scale"].float()
            zero = None
        else:
            shape = tuple(int(s) for s in parts["weight_shape"]) if "weight_shape" in parts \
                else tuple(parts["weight"].shape)
            scale = parts["weight_scale"].float()
            block = extra["block_scale"] if "block_scale" in extra else scale
            zero = None
            if isinstance(spec.format, IntFormat):
                b, off = spec.format.bit_width, _offset(spec.format)
                if "weight_packed" in parts:
                    q = unpack_int32(parts["weight_packed"], b, shape[1]) - (1 << (b - 1))
                else:
                    q = parts["weight"].to(torch.int64)
                values = (q + off).float()
                if spec.scale.asymmetric:
                    zp = parts["weight_zero_point"]
                    if zp.dtype == torch.int32:
                        zp = (unpack_int32(zp.T, b, scale.shape[0]).T - (1 << (b - 1)))
                    zero = (zp.to(torch.int64) + off).float().reshape(-1)
            else:
                values = parts["weight"].float()
    except KeyError as err:
        raise ExportError(f"layer {name}: the checkpoint lacks {name}.{err.args[0]}") from None
    tensor = extra.get("tensor_scale")
    block = block.reshape(-1).float().contiguous()
    return QuantizedTensor(codes=spec.format.encode(values).contiguous(), scales=block,
                           scale_codes=spec.scale.format.encode(block), zero_points=zero,
                           tensor_scale=None if tensor is None else tensor.float().reshape(()),
                           spec=spec, shape=tuple(values.shape), dtype=torch.float32)
