"""Float offsets (``asymf``): the GGUF Q4_1 layout ``x = q * d + m`` with d and m in fp16."""

import torch

import mixq
from mixq.quant import QuantSpec


def _q4_1_blocks(blocks: int, seed: int = 0) -> torch.Tensor:
    """Weights exactly as a Q4_1 dequantizer produces them: fp32(fp32(d * q) + m), d and m fp16."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(blocks, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(blocks, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (blocks, 32), generator=g).float()
    q[:, 0], q[:, 1] = 0, 15  # every block uses its whole range, as Q4_1 blocks do
    return (d * q + m).reshape(-1, 64)


def test_asymf_reproduces_q4_1_weights_exactly() -> None:
    x = _q4_1_blocks(128)
    y = mixq.fake_quantize(x, "uint4:g32:asymf:fp16")
    assert torch.equal(y, x)
    assert not torch.equal(mixq.fake_quantize(x, "uint4:g32:asym:fp16"), x)  # integer zero points cannot


def test_asymf_round_trips_and_counts_its_offsets() -> None:
    spec = QuantSpec.parse("uint4:g32:asymf:fp16")
    assert str(spec) == "uint4:g32:asymf:fp16" and QuantSpec.parse(str(spec)) == spec
    assert mixq.bits_per_value(spec, (64, 64)) == 4 + 16 / 32 + 16 / 32  # Q4_1: 5 bits per weight
    x = torch.randn(64, 64)
    qt = mixq.quantize(x, spec)
    assert qt.offsets is not None and qt.zero_points is None
    assert torch.equal(mixq.dequantize(qt), mixq.fake_quantize(x, spec))


def test_asymf_error_is_bounded_and_a_constant_group_is_exact() -> None:
    x = torch.randn(16, 32)
    x[3] = 0.25
    y = mixq.fake_quantize(x, "int4:g32:asymf")
    step = (x.amax(1) - x.amin(1)) / 15
    assert bool(((y - x).abs() <= step[:, None] / 2 + 1e-6).all())
    assert torch.equal(y[3], x[3])


def test_asymf_needs_a_signed_scale_format() -> None:
    import pytest

    with pytest.raises(mixq.quant.SpecError, match="signed"):
        QuantSpec.parse("uint4:g32:asymf:ue4m3")
