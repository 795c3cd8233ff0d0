"""A :class:`~mixq.quant.core.QuantizedTensor` as packed byte streams, one per part, and back.

Parts (each a uint8 1-D stream of :mod:`mixq.export.pack`, present only when the spec has it):

``codes``         element codes of ``spec.format``, row-major over the tensor's shape
``scales``        block-scale codes of ``spec.scale.format``, one per group (group order of ``Grouping``)
``zeros``         integer zero points (``asym``) as codes of the element format, one per group
``offsets``       float minima (``asymf``) as codes of the scale format, one per group
``tensor_scale``  the second-level scale as one code of ``spec.scale.tensor_scale``

Every part is stored in the width that :func:`mixq.quant.accounting.bit_count` counts, so
:func:`packed_bytes` exceeds the accounting by less than one byte per part. (The tensor scale is
stored as a code of its format rather than an fp32 number: the same 4 bytes for the default fp32,
and honest bytes for ``ts=fp16`` or ``ts=e8m0``.) Zero points and offsets of a group whose scale is
NaN (a non-finite group) are stored as code 0 and come back as NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from mixq.export.pack import pack_codes, packed_length, packing_scheme, unpack_codes
from mixq.formats import ScalarFormat
from mixq.quant.core import QuantizedTensor
from mixq.quant.granularity import Grouping
from mixq.quant.spec import QuantSpec

CODES, SCALES, ZEROS, OFFSETS, TENSOR_SCALE = "codes", "scales", "zeros", "offsets", "tensor_scale"


def part_formats(spec: QuantSpec, shape: tuple[int, ...]) -> dict[str, tuple[ScalarFormat, int]]:
    """The parts a tensor of ``shape`` quantized by ``spec`` is stored in: suffix -> (format, count)."""
    shape = tuple(int(d) for d in shape)
    groups = Grouping(shape, spec.granularity).num_groups
    s = spec.scale
    parts = {CODES: (spec.format, math.prod(shape)), SCALES: (s.format, groups)}
    if s.asymmetric:
        parts[OFFSETS if s.offset else ZEROS] = (s.format if s.offset else spec.format, groups)
    if s.tensor_scale is not None:
        parts[TENSOR_SCALE] = (s.tensor_scale, 1)
    return parts


def packed_bytes(spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """Exact bytes :func:`encode_tensor` writes for a tensor of ``shape`` quantized by ``spec``."""
    return sum(packed_length(n, packing_scheme(fmt)) for fmt, n in part_formats(spec, shape).values())


def _per_group_codes(values: torch.Tensor, fmt: ScalarFormat, block: torch.Tensor, what: str) -> torch.Tensor:
    """Codes of per-group ``values`` ([G] fp32); NaN where the block scale is NaN becomes code 0."""
    bad = torch.isnan(block)
    if bool((torch.isnan(values) & ~bad).any()):
        raise ValueError(f"{what} holds NaN in a group whose scale is finite; it cannot be stored")
    return fmt.encode(torch.where(bad, torch.zeros_like(values), values))


def encode_tensor(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """Packed parts of ``qt``: suffix -> uint8 1-D stream (see the module docstring for the suffixes)."""
    spec = qt.spec
    formats = part_formats(spec, qt.shape)
    if tuple(qt.codes.shape) != tuple(qt.shape):
        raise ValueError(f"codes have shape {tuple(qt.codes.shape)}, the tensor {tuple(qt.shape)}")
    values = {CODES: qt.codes, SCALES: qt.scale_codes}
    if ZEROS in formats:
        if qt.zero_points is None:
            raise ValueError(f"spec {spec} is asymmetric but the tensor has no zero points")
        values[ZEROS] = _per_group_codes(qt.zero_points, spec.format, qt.scales, "zero points")
    if OFFSETS in formats:
        if qt.offsets is None:
            raise ValueError(f"spec {spec} has float offsets (asymf) but the tensor has none")
        values[OFFSETS] = _per_group_codes(qt.offsets, spec.scale.format, qt.scales, "offsets")
    if TENSOR_SCALE in formats:
        if qt.tensor_scale is None:
            raise ValueError(f"spec {spec} has a tensor scale but the tensor has none")
        values[TENSOR_SCALE] = spec.scale.tensor_scale.encode(qt.tensor_scale.detach().float().reshape(1))
    out = {}
    for suffix, (fmt, count) in formats.items():
        if values[suffix].numel() != count:
            raise ValueError(f"part {suffix} of {spec} {tuple(qt.shape)} has {values[suffix].numel()} "
                             f"values, expected {count}")
        out[suffix] = pack_codes(values[suffix], fmt)
    return out


def decode_tensor(parts: Mapping[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, ...],
                  dtype: torch.dtype) -> QuantizedTensor:
    """The :class:`QuantizedTensor` that :func:`encode_tensor` packed into ``parts``.

    Raises ``ValueError`` naming the part when a part is missing, unexpected, of the wrong length or
    holds invalid codes.
    """
    shape = tuple(int(d) for d in shape)
    formats = part_formats(spec, shape)
    if set(parts) != set(formats):
        raise ValueError(f"a {spec} tensor is stored in parts {sorted(formats)}, got {sorted(parts)}")
    codes: dict[str, torch.Tensor] = {}
    for suffix, (fmt, count) in formats.items():
        try:
            codes[suffix] = unpack_codes(parts[suffix], fmt, count)
        except ValueError as err:
            raise ValueError(f"part {suffix!r} ({fmt.name}, {count} values): {err}") from None
    scales = spec.scale.format.decode(codes[SCALES])  # [G] fp32
    bad = torch.isnan(scales)

    def per_group(suffix: str, fmt: ScalarFormat) -> torch.Tensor | None:
        if suffix not in codes:
            return None
        return torch.where(bad, torch.nan, fmt.decode(codes[suffix]))

    ts = spec.scale.tensor_scale
    return QuantizedTensor(
        codes=codes[CODES].reshape(shape),
        scales=scales,
        scale_codes=codes[SCALES],
        zero_points=per_group(ZEROS, spec.format),
        tensor_scale=ts.decode(codes[TENSOR_SCALE]).reshape(()) if ts is not None else None,
        spec=spec,
        shape=shape,
        dtype=dtype,
        offsets=per_group(OFFSETS, spec.scale.format),
    )
