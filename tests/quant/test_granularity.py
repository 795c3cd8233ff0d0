"""Granularities: which elements form a group, the inverse reshaping, and refused shapes.

The semantic check: quantizing with a granularity equals quantizing every group on its own with
one per-tensor scale.
"""

from __future__ import annotations

import pytest
import torch

from mixq import fake_quantize
from mixq.quant import GroupSizeError, Grouping, PerBlock, PerChannel, PerGroup, PerTensor, PerToken


def arange(*shape: int) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    return torch.arange(n, dtype=torch.float32).reshape(shape)


CASES = [
    ((4, 6), PerTensor(), 1),
    ((4, 6), PerChannel(0), 4),
    ((4, 6), PerChannel(1), 6),
    ((2, 3, 4), PerChannel(1), 3),
    ((2, 3, 4), PerChannel(-1), 4),
    ((2, 3, 4), PerToken(), 6),
    ((4, 6), PerGroup(3), 8),
    ((4, 6), PerGroup(2, axis=0), 12),
    ((2, 4, 6), PerGroup(2, axis=1), 24),
    ((4, 6), PerBlock(2, 3), 4),
    ((2, 4, 6), PerBlock(2, 2), 12),
    ((8,), PerGroup(4), 2),
    ((), PerTensor(), 1),
]


@pytest.mark.parametrize("shape,gran,groups", CASES, ids=[f"{s}-{g}" for s, g, _ in CASES])
def test_to_groups_and_back(shape, gran, groups):
    grouping = Grouping(shape, gran)
    x = arange(*shape)
    X = grouping.to_groups(x)
    assert X.shape == (groups, x.numel() // groups)
    assert grouping.num_groups == groups and grouping.group_size == x.numel() // groups
    assert torch.equal(grouping.from_groups(X), x)
    assert sorted(X.flatten().tolist()) == x.flatten().tolist()  # a permutation of the elements


def test_group_contents():
    x = arange(4, 6)
    assert torch.equal(Grouping((4, 6), PerChannel(0)).to_groups(x), x)
    assert torch.equal(Grouping((4, 6), PerChannel(1)).to_groups(x), x.T)
    assert Grouping((4, 6), PerGroup(3)).to_groups(x)[1].tolist() == [3, 4, 5]
    assert Grouping((4, 6), PerGroup(2, axis=0)).to_groups(x)[:3].tolist() == [[0, 6], [12, 18], [1, 7]]
    assert Grouping((4, 6), PerBlock(2, 3)).to_groups(x)[1].tolist() == [3, 4, 5, 9, 10, 11]
    assert Grouping((4, 6), PerBlock(2, 3)).to_groups(x)[2].tolist() == [12, 13, 14, 18, 19, 20]
    y = arange(2, 3, 4)
    assert torch.equal(Grouping((2, 3, 4), PerToken()).to_groups(y), y.reshape(6, 4))
    assert Grouping((2, 3, 4), PerChannel(1)).to_groups(y)[2].tolist() == [8, 9, 10, 11, 20, 21, 22, 23]


def per_group_reference(x: torch.Tensor, grouping: Grouping, element: str) -> torch.Tensor:
    X = grouping.to_groups(x)
    rows = [fake_quantize(X[i].clone(), element) for i in range(X.shape[0])]
    return grouping.from_groups(torch.stack(rows))


@pytest.mark.parametrize("token,gran", [("channel", PerChannel(0)), ("channel@1", PerChannel(1)),
                                        ("token", PerToken()), ("g4", PerGroup(4)), ("g2@0", PerGroup(2, 0)),
                                        ("b2x4", PerBlock(2, 4))])
@pytest.mark.parametrize("element", ["int4", "fp8_e4m3", "nf4", "int4:asym", "fp4_e2m1:e8m0"])
def test_each_group_is_quantized_on_its_own(token, gran, element):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g) * torch.logspace(-2, 2, 8)
    base, *rest = element.split(":")
    spec = ":".join([base, token, *rest])
    expected = per_group_reference(x, Grouping((4, 8), gran), element)
    assert torch.equal(fake_quantize(x, spec), expected)


def test_finer_groups_do_not_increase_the_error_on_outlier_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, generator=g)
    x[0, 0] = 50.0
    err = {t: (fake_quantize(x, f"int4:{t}") - x).pow(2).sum().item() for t in ("tensor", "channel", "g16")}
    assert err["g16"] < err["channel"] < err["tensor"]


@pytest.mark.parametrize("shape,gran,fragments", [
    ((64, 576), PerGroup(128), ["128", "576"]),
    ((64, 576), PerGroup(128, axis=0), ["128", "64"]),
    ((16, 24), PerBlock(16, 16), ["16x16", "(16, 24)"]),
    ((16,), PerBlock(4, 4), ["4x4"]),
    ((4, 6), PerChannel(2), ["axis 2"]),
    ((4, 6), PerGroup(2, axis=-3), ["axis -3"]),
    ((), PerChannel(0), ["scalar"]),
    ((), PerToken(), ["scalar"]),
])
def test_shapes_that_do_not_fit_are_refused(shape, gran, fragments):
    with pytest.raises(GroupSizeError) as err:
        Grouping(shape, gran)
    for f in fragments:
        assert f in str(err.value)
    assert isinstance(err.value, ValueError)


def test_group_size_error_suggests_divisors():
    with pytest.raises(GroupSizeError, match="e.g. 16, 32, 64, 96, 192"):
        Grouping((64, 576), PerGroup(128))


def test_invalid_granularity_parameters():
    with pytest.raises(ValueError):
        PerGroup(0)
    with pytest.raises(ValueError):
        PerBlock(0, 4)


def test_empty_shapes():
    assert Grouping((0, 64), PerGroup(64)).num_groups == 0
    assert Grouping((0, 64), PerToken()).num_groups == 0
    assert Grouping((3, 0), PerChannel(0)).num_groups == 3
    assert Grouping((0,), PerTensor()).num_groups == 1
