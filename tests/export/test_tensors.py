"""Every format and spec feature: quantize -> encode_tensor -> decode_tensor gives the same tensor exactly."""

from dataclasses import replace

import pytest
import torch

from mixq.export.tensors import decode_tensor, encode_tensor, packed_bytes, part_formats
from mixq.formats import BlockFormat, ExponentFormat, get, names
from mixq.quant import QuantSpec, dequantize, quantize
from mixq.quant.accounting import bit_count
from mixq.quant.granularity import GroupSizeError


def _specs() -> list[str]:
    out = []
    for name in names():
        fmt = get(name)
        if isinstance(fmt, BlockFormat):
            out.append(name)
        elif isinstance(fmt, ExponentFormat):
            out.append(f"int4:g32:{name}")  # a scale-only format: test it as the block scale
        else:
            out.append(f"{name}:g16")
    out += [f"int{b}:channel" for b in range(1, 9)] + [f"uint{b}:g16:asym" for b in range(1, 9)]
    out += ["int3:g16:asym", "int8:channel:asym", "int4n:g16:asym", "int4:g16:asymf", "int4:g16:asymf:fp16",
            "int4:g16:asymf:bf16:ceil", "int4:g16:ue4m3:ts=fp16", "int4:g16:ue4m3:ts=e8m0",
            "fp4_e2m1:g16:ue4m3:ts", "int4:b4x8", "int4:b4x8:asym", "int8:token", "int8", "fp8_e4m3:channel",
            "int4:g16:mse", "ternary:channel", "ternary:g32", "binary:channel", "nf4:g64", "pow4_1.5:g16",
            "grid(-1,-0.25,0,0.25,1):g16", "e5m2b12:g16",
            "int4:g16:sr", "int4:g16:p99", "mxfp4:mse", "int2:g2@0", "uint8:token:asym"]
    return out


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Bit-identical (NaN matches NaN of any payload; -0.0 differs from 0.0)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    a, b = a.float().nan_to_num(0.0).view(torch.int32), b.float().nan_to_num(0.0).view(torch.int32)
    return torch.equal(a, b)


def _stores_nan(fmt) -> bool:
    try:
        return bool(fmt.decode(fmt.encode(torch.tensor([torch.nan]))).isnan().all())
    except ValueError:
        return False


def _input(spec: QuantSpec, shape: tuple[int, ...], seed: int, nan: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[-1])  # columns of different magnitudes
    if nan:
        x[0, 0] = torch.nan  # one non-finite group
    return x


@pytest.mark.parametrize("text", _specs())
@pytest.mark.parametrize("shape", [(8, 64), (2, 4, 64)])
def test_encode_decode_is_exact(text, shape):
    spec = QuantSpec.parse(text)
    if spec.granularity.token() == "b4x8" and len(shape) == 3:
        shape = (8, 64)
    nan = _stores_nan(spec.scale.format)
    x = _input(spec, shape, seed=len(text), nan=nan)
    g = torch.Generator().manual_seed(1)
    qt = quantize(x, spec, generator=g)
    parts = encode_tensor(qt)
    assert set(parts) == set(part_formats(spec, shape))
    assert all(p.dtype == torch.uint8 and p.dim() == 1 for p in parts.values())
    assert sum(p.numel() for p in parts.values()) == packed_bytes(spec, shape)
    back = decode_tensor(parts, spec, shape, x.dtype)
    for field in ("codes", "scales", "scale_codes", "zero_points", "tensor_scale", "offsets"):
        assert same(getattr(qt, field), getattr(back, field)), field
    assert back.spec == spec and back.shape == qt.shape and back.dtype == qt.dtype
    assert same(dequantize(back), dequantize(qt))
    assert bool(dequantize(back).isnan().any()) == nan


@pytest.mark.parametrize("text", _specs())
def test_packed_bytes_against_accounting(text):
    spec = QuantSpec.parse(text)
    for shape in [(8, 64), (7, 96), (64, 128)]:
        try:
            accounted = bit_count(spec, shape).bytes
        except GroupSizeError:
            continue  # the spec does not fit this shape
        n_parts = len(part_formats(spec, shape))
        packed = packed_bytes(spec, shape)
        assert 0 <= packed - accounted < n_parts, (shape, packed, accounted)


def test_dtype_is_kept():
    x = torch.randn(4, 32).to(torch.bfloat16)
    qt = quantize(x, "int4:g16")
    back = decode_tensor(encode_tensor(qt), qt.spec, qt.shape, qt.dtype)
    assert dequantize(back).dtype == torch.bfloat16 and same(dequantize(back), dequantize(qt))


def test_damaged_parts_name_the_part():
    qt = quantize(torch.randn(4, 32), "int4:g16:asym")
    parts = encode_tensor(qt)
    with pytest.raises(ValueError, match=r"parts \['codes', 'scales', 'zeros'\]"):
        decode_tensor({k: v for k, v in parts.items() if k != "zeros"}, qt.spec, qt.shape, qt.dtype)
    with pytest.raises(ValueError, match="part 'scales'"):
        decode_tensor({**parts, "scales": parts["scales"][:-1]}, qt.spec, qt.shape, qt.dtype)
    with pytest.raises(ValueError, match="part 'codes'"):
        decode_tensor({**parts, "codes": parts["codes"][1:]}, qt.spec, qt.shape, qt.dtype)


def test_inconsistent_tensor_is_refused():
    qt = quantize(torch.randn(4, 32), "int4:g16:asym")

    with pytest.raises(ValueError, match="no zero points"):
        encode_tensor(replace(qt, zero_points=None))
    with pytest.raises(ValueError, match="NaN in a group whose scale is finite"):
        encode_tensor(replace(qt, zero_points=torch.full_like(qt.zero_points, torch.nan)))
