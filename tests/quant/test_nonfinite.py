"""A NaN or inf stays inside its own group, for every spec, in fake_quantize and in quantize."""

import pytest
import torch

import mixq

SPECS = ["nvfp4", "nvint4", "fp4_e2m1:g16:fp8_e4m3:ts", "mxfp4", "mxint8", "int4:g32", "int4:g32:asym",
         "nf4:g64", "binary:g32", "uint4:g32:asymf:fp16"]


def _with(value: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    bad = x.clone()
    bad[2, 5] = value
    return x, bad


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", SPECS)
def test_one_bad_value_spoils_only_its_group(spec: str, value: float) -> None:
    x, bad = _with(value)
    y = mixq.fake_quantize(bad, spec, backend="torch")
    groups = mixq.quant.Grouping(tuple(x.shape), mixq.QuantSpec.parse(spec).granularity)
    nan_groups = torch.isnan(groups.to_groups(y)).all(dim=1)
    assert int(nan_groups.sum()) == 1  # exactly the group holding the bad value, entirely NaN
    assert not torch.isnan(groups.to_groups(y)[~nan_groups]).any()
    # the other groups are what they are without the bad value, unless it changed the tensor scale
    clean = groups.to_groups(mixq.fake_quantize(x, spec, backend="torch"))[~nan_groups]
    if mixq.QuantSpec.parse(spec).scale.tensor_scale is None:
        assert torch.equal(groups.to_groups(y)[~nan_groups], clean)


@pytest.mark.parametrize("spec", SPECS)
def test_quantize_keeps_nan_groups_in_the_scale(spec: str) -> None:
    _, bad = _with(float("nan"))
    qt = mixq.quantize(bad, spec)
    assert torch.equal(torch.isnan(mixq.dequantize(qt)), torch.isnan(mixq.fake_quantize(bad, spec)))
    assert int(torch.isnan(qt.scales).sum()) == 1
    if spec.startswith("mx"):
        assert int((qt.scale_codes == 255).sum()) == 1  # the E8M0 NaN code, as OCP MX prescribes
