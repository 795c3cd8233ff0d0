"""SmoothQuant factors: the alpha balance, zero channels, folding identity, W8A8 error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.algorithms.smoothquant import SmoothQuantError, smooth_factors
from mixq.quant import fake_quantize

OUTLIERS = [3, 17, 40]


def outlier_data(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 64, generator=g)
    X[:, OUTLIERS] *= 50.0
    return X, [torch.randn(48, 64, generator=g) * 0.1, torch.randn(32, 64, generator=g) * 0.1]


@settings(max_examples=30)
@given(alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_alpha_relation(alpha, seed):
    """(max|X_j| / s_j)^alpha == (max|W_j| s_j)^(1 - alpha), the defining balance."""
    X, Ws = outlier_data(seed)
    s = smooth_factors(X.abs().amax(dim=0), Ws, alpha).double()
    a = (X.double() / s).abs().amax(dim=0)
    w = torch.stack([(W.double() * s).abs().amax(dim=0) for W in Ws]).amax(dim=0)
    assert torch.allclose(a ** alpha, w ** (1 - alpha), rtol=1e-4)


def test_half_alpha_equalizes():
    X, Ws = outlier_data(1)
    s = smooth_factors(X.abs().amax(dim=0), Ws, 0.5)
    a = (X / s).abs().amax(dim=0)
    w = torch.stack([(W * s).abs().amax(dim=0) for W in Ws]).amax(dim=0)
    assert torch.allclose(a, w, rtol=1e-4)
    assert float(X.abs().amax() / X.abs().amax(dim=0).median()) > 20  # outliers before
    assert float(a.amax() / a.median()) < 10  # tamed after


def test_zero_channels_get_one():
    X, Ws = outlier_data(2)
    X[:, 5] = 0.0
    Ws[0][:, 9] = 0.0
    Ws[1][:, 9] = 0.0
    s = smooth_factors(X.abs().amax(dim=0), Ws, 0.5)
    assert bool(torch.isfinite(s).all()) and bool((s >= 1e-5).all())
    assert s[5] == 1.0 and s[9] == 1.0
    assert s.dtype == torch.float32 and s.shape == (64,)


def test_extremes_of_alpha():
    X, Ws = outlier_data(3)
    a = X.abs().amax(dim=0)
    w = torch.stack([W.abs().amax(dim=0) for W in Ws]).amax(dim=0)
    assert torch.allclose(smooth_factors(a, Ws, 1.0), a)
    assert torch.allclose(smooth_factors(a, Ws, 0.0), 1.0 / w)


def test_folding_identity():
    X, Ws = outlier_data(4)
    s = smooth_factors(X.abs().amax(dim=0), Ws, 0.5)
    for W in Ws:
        bound = 1e-5 * (X.abs() @ W.abs().T)
        assert bool(((((X / s) @ (W * s).T) - X @ W.T).abs() <= bound).all())


@pytest.mark.parametrize("act_spec, w_spec", [("int8", "int8"), ("int8:token", "int8:channel")])
def test_w8a8_error_drops(act_spec, w_spec):
    X, Ws = outlier_data(5)
    s = smooth_factors(X.abs().amax(dim=0), Ws, 0.5)

    def err(Xin, W):
        return float(((fake_quantize(Xin, act_spec) @ fake_quantize(W, w_spec).T - X @ Ws[0].T) ** 2).sum())

    plain, smooth = err(X, Ws[0]), err(X / s, Ws[0] * s)
    assert smooth < 0.5 * plain, (smooth, plain)


def test_errors():
    X, Ws = outlier_data()
    with pytest.raises(SmoothQuantError, match="alpha"):
        smooth_factors(X.abs().amax(dim=0), Ws, 1.5)
    with pytest.raises(ValueError, match=r"\[out, 64\]"):
        smooth_factors(X.abs().amax(dim=0), [torch.randn(3, 10)])
    with pytest.raises(ValueError, match="empty"):
        smooth_factors(X.abs().amax(dim=0), [])
