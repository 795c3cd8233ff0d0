"""AWQ scale search and clipping on synthetic data with outlier input channels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.algorithms.awq import (AWQError, AWQResult, _factor_for, _quantize_stack, _row_sq_errors,
                                 _rows_independent, _unit_errors, awq_clip, awq_factor, awq_search)
from mixq.quant import QuantSpec, fake_quantize

N, IN, OUT = 384, 256, 96
OUTLIERS = [5, 70, 131, 200]


def outlier_data(seed: int = 0, n: int = N) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, IN, generator=g)
    X[:, OUTLIERS] *= 50.0
    Ws = [torch.randn(OUT, IN, generator=g) * 0.05, torch.randn(OUT // 2, IN, generator=g) * 0.05]
    return X, Ws


def out_err(X: torch.Tensor, W: torch.Tensor, Wq: torch.Tensor) -> float:
    """Sum of squared output errors, in fp64 (the oracle)."""
    return float(((X.double() @ (W.double() - Wq.double()).T) ** 2).sum())


def awq_sq_error(X, Ws, spec, s) -> float:
    """Slow oracle: sum_i ||X W_i^T - (X / s) Q(W_i s)^T||^2 computed literally."""
    total = 0.0
    for W in Ws:
        ref = X.double() @ W.double().T
        got = (X / s).double() @ fake_quantize(W * s, spec).double().T
        total += float(((ref - got) ** 2).sum())
    return total


@pytest.mark.parametrize("spec", ["int4:g64", "int3:g64", "nvfp4"])
def test_awq_beats_rtn_on_outlier_channels(spec):
    X, Ws = outlier_data()
    r = awq_search(X, Ws, spec)
    assert isinstance(r, AWQResult) and r.alpha > 0
    assert r.scales.shape == (IN,) and r.scales.dtype == torch.float32 and bool((r.scales > 0).all())
    rtn = awq_sq_error(X, Ws, spec, torch.ones(IN))
    awq = awq_sq_error(X, Ws, spec, r.scales)
    assert awq < 0.7 * rtn, (awq, rtn)
    assert r.loss < r.loss_before
    # outlier channels get the largest scales
    assert set(r.scales.topk(len(OUTLIERS)).indices.tolist()) == set(OUTLIERS)


@pytest.mark.parametrize("spec", ["int4:g64", "int4:channel", "int4:g64:asym", "nvfp4", "int4"])
def test_reported_losses_match_oracle(spec):
    X, Ws = outlier_data(1)
    count = X.shape[0] * sum(W.shape[0] for W in Ws)
    r = awq_search(X, Ws, spec, grid=8)
    assert r.loss_before == pytest.approx(awq_sq_error(X, Ws, spec, torch.ones(IN)) / count, rel=1e-4)
    assert r.loss == pytest.approx(awq_sq_error(X, Ws, spec, r.scales) / count, rel=1e-4)


def test_alpha_zero_is_plain_rtn():
    X, Ws = outlier_data(2)
    r = awq_search(X, Ws, "int4:g64", grid=1)
    count = X.shape[0] * sum(W.shape[0] for W in Ws)
    rtn = sum(out_err(X, W, fake_quantize(W, "int4:g64")) for W in Ws) / count
    assert r.alpha == 0.0 and torch.equal(r.scales, torch.ones(IN))
    assert r.loss == r.loss_before == pytest.approx(rtn, rel=1e-4)


def test_gram_and_direct_paths_agree():
    """Many rows use QR's triangular R, few rows use X: both give the same loss (rows duplicated)."""
    X, Ws = outlier_data(3, n=128)
    rows = 6 * sum(W.shape[0] for W in Ws)
    assert _factor_for(X, rows, None)[1] is False and _factor_for(X.repeat(4, 1), rows, None)[1] is True
    small = awq_search(X, Ws, "int3:g64", grid=6)
    big = awq_search(X.repeat(4, 1), Ws, "int3:g64", grid=6)  # 512 rows > 256 inputs: the Gram path
    assert big.alpha == small.alpha
    assert big.loss == pytest.approx(small.loss, rel=1e-3)


def test_scales_are_normalized():
    X, Ws = outlier_data(4)
    s = awq_search(X, Ws, "int4:g64").scales
    assert float((s.max() * s.min()).sqrt()) == pytest.approx(1.0, rel=1e-5)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**16), log_range=st.floats(0.0, 3.0))
def test_scale_folding_identity(seed, log_range):
    g = torch.Generator().manual_seed(seed)
    X, W = torch.randn(16, 32, generator=g), torch.randn(8, 32, generator=g)
    s = 10.0 ** ((torch.rand(32, generator=g) * 2 - 1) * log_range)
    ref = X @ W.T
    bound = 1e-5 * (X.abs() @ W.abs().T) + 1e-6
    assert bool((((X / s) @ (W * s).T) - ref).abs().le(bound).all())


def test_awq_errors():
    X, Ws = outlier_data()
    with pytest.raises(AWQError, match=r"\[out, 256\]"):
        awq_search(X, [torch.randn(4, 100)], "int4:g64")
    with pytest.raises(ValueError, match="empty"):
        awq_search(X, [], "int4:g64")
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(AWQError, match="NaN"):
        awq_search(bad, Ws, "int4:g64")
    with pytest.raises(AWQError, match="max_shrink"):
        awq_clip(Ws[0], X, "int4:g64", max_shrink=1.0)
    with pytest.raises(AWQError, match=r"factor must be \[k, 256\]"):
        awq_search(X, Ws, "int4:g64", factor=torch.eye(100))


def heavy_tailed(seed: int, out: int = OUT) -> torch.Tensor:
    """Student-t weights with 3 degrees of freedom: Z / sqrt(chi2_3 / 3), seeded."""
    g = torch.Generator().manual_seed(seed)
    Z, V = torch.randn(out, IN, generator=g), torch.randn(3, out, IN, generator=g)
    return 0.05 * Z / ((V ** 2).sum(dim=0) / 3).sqrt()


CLIP_SPECS = ["int4:g64", "int3:g64", "int4:channel", "int4:g64:asym", "nvfp4", "mxfp4", "int4",
              "int4:b16x16"]


@pytest.mark.parametrize("spec", CLIP_SPECS)
@pytest.mark.parametrize("n", [24, N])  # fewer rows than a group (direct path) and more (Gram path)
def test_clip_never_worse(spec, n):
    X, Ws = outlier_data(5, n=n)
    for W in (Ws[0], heavy_tailed(6)):
        C = awq_clip(W, X, spec, grid=10)
        assert C.shape == W.shape and C.dtype == torch.float32
        assert out_err(X, W, fake_quantize(C, spec)) <= out_err(X, W, fake_quantize(W, spec)) * (1 + 1e-6)
        assert bool((C.abs() <= W.abs()).all()) and bool((C * W >= 0).all())  # a clamp: no growth, no flip


@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), spec=st.sampled_from(CLIP_SPECS), shrink=st.floats(0.0, 0.9))
def test_clip_never_worse_property(seed, spec, shrink):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(48, IN, generator=g) * torch.rand(IN, generator=g) * 10
    W = torch.randn(32, IN, generator=g) ** 3
    C = awq_clip(W, X, spec, grid=6, max_shrink=shrink)
    assert out_err(X, W, fake_quantize(C, spec)) <= out_err(X, W, fake_quantize(W, spec)) * (1 + 1e-6)


def test_clip_strictly_better_on_heavy_tails():
    X, _ = outlier_data(7)
    W = heavy_tailed(8)
    C = awq_clip(W, X, "int3:g64")
    spec = "int3:g64"
    assert out_err(X, W, fake_quantize(C, spec)) < 0.5 * out_err(X, W, fake_quantize(W, spec))
    assert not torch.equal(C, W)


@pytest.mark.parametrize("spec", ["int4:g64", "int4:channel", "int4:g64:asym", "nvfp4"])
def test_clip_search_alone_helps(spec, monkeypatch):
    """With the final safety check disabled, the per-group search must still cut the output error
    (it is measured against the float W, not against the clamped weight)."""
    import mixq.algorithms.awq as awq_module
    monkeypatch.setattr(awq_module, "_never_worse", lambda W, C, *rest: C)
    X, Ws = outlier_data(11)
    C = awq_clip(Ws[0], X, spec, grid=10)
    assert out_err(X, Ws[0], fake_quantize(C, spec)) < 0.5 * out_err(X, Ws[0], fake_quantize(Ws[0], spec))


def test_clip_without_shrink_is_identity():
    X, Ws = outlier_data(9)
    assert torch.equal(awq_clip(Ws[0], X, "int4:g64", max_shrink=0.0), Ws[0])


def test_unit_errors_oracle():
    """Per (row, group) output error, Gram form and direct form, against a literal loop."""
    g = torch.Generator().manual_seed(10)
    n, G, k, out = 20, 3, 8, 5
    X3, E = torch.randn(n, G, k, generator=g), torch.randn(out, G, k, generator=g)
    want = torch.tensor([[float(((X3[:, j] @ E[o, j]) ** 2).sum()) for j in range(G)] for o in range(out)])
    grams = X3.permute(1, 2, 0) @ X3.transpose(0, 1)
    assert torch.allclose(_unit_errors(X3, None, E), want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(_unit_errors(X3, grams, E), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [40, 256, 700])
def test_factor_and_row_errors_oracle(n):
    """F^T F = X^T X; per-row output errors through F (triangular or not) match a literal fp64 loop,
    also for F / s as the factor of X / s."""
    X, Ws = outlier_data(12, n=n)
    F = awq_factor(X)
    assert F.dtype == torch.float32 and F.shape == ((IN, IN) if n > IN else (n, IN))
    if n > IN:
        assert not bool(F.tril(-1).any())
    H = X.double().T @ X.double()
    assert torch.allclose(F.double().T @ F.double(), H, rtol=1e-4, atol=1e-3 * float(H.abs().max()))
    s = torch.rand(IN, generator=torch.Generator().manual_seed(13)) + 0.5
    D = Ws[0] - fake_quantize(Ws[0], "int4:g64")
    for Xf, Ff in ((X, F), (X / s, F / s)):
        Fc, tri = _factor_for(Xf, 10**6, Ff)
        assert tri == (n > IN)
        want = ((Xf.double() @ D.double().T) ** 2).sum(dim=0)  # [out]
        assert torch.allclose(_row_sq_errors(Fc, tri, D).double(), want, rtol=1e-4)


def test_shared_factor_gives_same_results():
    """A factor computed once and passed to the search and (scaled) to the clips changes nothing."""
    X, Ws = outlier_data(14, n=1024)
    F = awq_factor(X)
    r0, r1 = awq_search(X, Ws, "int4:g64"), awq_search(X, Ws, "int4:g64", factor=F)
    assert r1.alpha == r0.alpha and torch.equal(r1.scales, r0.scales)
    assert r1.loss == pytest.approx(r0.loss, rel=1e-5)
    assert r1.loss_before == pytest.approx(r0.loss_before, rel=1e-5)
    Xs = X / r0.scales
    for W in (Ws[0] * r0.scales, heavy_tailed(15) * r0.scales):
        C0, C1 = awq_clip(W, Xs, "int3:g64"), awq_clip(W, Xs, "int3:g64", factor=F / r0.scales)
        e0, e1 = out_err(Xs, W, fake_quantize(C0, "int3:g64")), out_err(Xs, W, fake_quantize(C1, "int3:g64"))
        assert e1 == pytest.approx(e0, rel=1e-4) and e1 < out_err(Xs, W, fake_quantize(W, "int3:g64"))


@pytest.mark.parametrize("spec", CLIP_SPECS + ["int4:token", "int8:g32:mse"])
def test_quantize_stack_equals_separate_calls(spec):
    """Stacked candidates quantize exactly as separate matrices, in one call or one per matrix."""
    spec = QuantSpec.parse(spec)
    g = torch.Generator().manual_seed(16)
    A = torch.randn(3, 96 + 48, IN, generator=g) * torch.rand(3, 1, 1, generator=g) * 4  # [b, rows, in]
    got = _quantize_stack(A, spec, [96, 48])
    want = torch.stack([torch.cat([fake_quantize(a[:96], spec), fake_quantize(a[96:], spec)]) for a in A])
    assert torch.equal(got, want)
    coupled = str(spec) in ("nvfp4", "int4", "int4:b16x16")  # tensor scale, one group, 16-row tiles
    assert _rows_independent(spec) is not coupled


def test_stochastic_rounding_is_never_stacked():
    assert not _rows_independent(QuantSpec.parse("int4:g64:sr"))


@pytest.mark.parametrize("spec", ["int4:g64", "nvfp4"])
def test_stack_budget_does_not_change_results(spec, monkeypatch):
    """Quantizing one candidate per call (budget 1) or a few per call gives the same search and clip."""
    import mixq.algorithms.awq as awq_module
    X, Ws = outlier_data(17)
    r0, C0 = awq_search(X, Ws, spec, grid=7), awq_clip(Ws[0], X, spec, grid=7)
    for budget in (1, 3 * Ws[0].numel()):
        monkeypatch.setattr(awq_module, "STACK_ELEMENTS", budget)
        r1 = awq_search(X, Ws, spec, grid=7)
        assert r1.alpha == r0.alpha and torch.equal(r1.scales, r0.scales)
        assert r1.loss == pytest.approx(r0.loss, rel=1e-6)
        assert torch.equal(awq_clip(Ws[0], X, spec, grid=7), C0)
