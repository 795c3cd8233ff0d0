"""LayerStats: Hessian, channel maxima, mean and row sample against plain oracles; exact rescale."""

from __future__ import annotations

import pytest
import torch

from mixq.algorithms.layer_stats import LayerStats


def batches(seed: int = 0, n: int = 4, d: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # varied leading shapes, per-channel scales and offsets (the mean must not be ~0)
    shapes = [(2, 9, d), (13, d), (1, 5, d), (3, 3, d)][:n]
    scale = torch.rand(d, generator=g) * 4 + 0.1
    return [torch.randn(*s, generator=g) * scale + 0.3 for s in shapes]


def stats(d: int = 24, sample_rows: int = 0, seed: int = 0) -> LayerStats:
    return LayerStats(d, hessian=True, absmax=True, mean=True, sample_rows=sample_rows, seed=seed)


def rows(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()  # [n, in] fp64


def test_oracles():
    xs = batches()
    st = stats()
    for x in xs:
        st.add(x)
    X = rows(xs)
    assert st.count == X.shape[0] == 18 + 13 + 5 + 9
    assert torch.allclose(st.H.double(), 2 / X.shape[0] * X.T @ X, rtol=1e-5, atol=1e-5)
    assert torch.equal(st.absmax, X.abs().amax(0).float())
    assert torch.allclose(st.mean.double(), X.mean(0), rtol=0, atol=1e-6)
    assert st.H.dtype == st.mean.dtype == st.absmax.dtype == torch.float32
    assert st.sample is None


def test_half_precision_inputs_are_upcast():
    xs = [x.to(torch.bfloat16) for x in batches()]
    st = stats()
    for x in xs:
        st.add(x)
    X = rows(xs)  # the bf16 values, exactly
    assert torch.allclose(st.H.double(), 2 / X.shape[0] * X.T @ X, rtol=1e-5, atol=1e-5)


def test_only_requested_statistics():
    st = LayerStats(8, hessian=False, absmax=False, mean=False, sample_rows=0)
    st.add(torch.randn(4, 8))
    assert st.H is None and st.absmax is None and st.mean is None and st.sample is None and st.count == 4


def test_sample_rows_come_from_the_inputs():
    xs = batches(n=4)
    st = stats(sample_rows=16, seed=3)
    for x in xs:
        st.add(x)
    S = st.sample
    X = rows(xs).float()
    assert S.shape == (4 * 2, 24)  # at most sample_rows // 8 rows per batch: spread over batches
    # every sampled row is one of the input rows, and no input row is taken twice
    match = (S[:, None, :] == X[None, :, :]).all(-1)  # [8, n]
    assert match.any(1).all()
    assert len({int(i) for i in match.float().argmax(1)}) == 8
    # the sample stops at sample_rows
    many = stats(sample_rows=16)
    for _ in range(5):
        for x in xs:
            many.add(x)
    assert many.sample.shape[0] == 16
    big = stats(sample_rows=1000)
    for x in xs:
        big.add(x)
    assert big.sample.shape[0] == min(125, 18) + min(125, 13) + 5 + 9


def test_sample_is_seeded():
    xs = batches()
    a, b, c = stats(sample_rows=12, seed=1), stats(sample_rows=12, seed=1), stats(sample_rows=12, seed=2)
    for x in xs:
        for st in (a, b, c):
            st.add(x)
    assert torch.equal(a.sample, b.sample) and not torch.equal(a.sample, c.sample)


@pytest.mark.parametrize("twice", [False, True])
def test_rescale_equals_recomputing_on_scaled_inputs(twice):
    xs = batches()
    g = torch.Generator().manual_seed(7)
    s1 = torch.rand(24, generator=g) * 3 + 0.2
    s2 = torch.rand(24, generator=g) * 3 + 0.2
    a = stats(sample_rows=16, seed=5)
    b = stats(sample_rows=16, seed=5)
    for x in xs:
        a.add(x)
        b.add(x / s1 / s2 if twice else x / s1)
    a.rescale(s1)
    if twice:
        a.rescale(s2)
    assert torch.allclose(a.H, b.H, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.absmax, b.absmax, rtol=1e-6, atol=0)
    assert torch.allclose(a.mean, b.mean, rtol=1e-5, atol=1e-7)
    assert torch.allclose(a.sample, b.sample, rtol=1e-6, atol=0)
    assert a.count == b.count
    # the rescale really changed the statistics
    ref = stats()
    for x in xs:
        ref.add(x)
    assert not torch.allclose(a.H, ref.H, rtol=1e-2)

