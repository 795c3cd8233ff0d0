"""Bias correction and salient-row selection."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixq.algorithms.bias_correction import BiasCorrectionError, corrected_bias
from mixq.algorithms.salient import SalientError, row_errors, salient_rows
from mixq.quant import fake_quantize


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(500, 32, generator=g) + torch.linspace(-2, 3, 32)  # non-zero mean inputs
    W = torch.randn(16, 32, generator=g)
    return X, W, fake_quantize(W, "int3:g16:asym"), torch.randn(16, generator=g)


@pytest.mark.parametrize("with_bias", [True, False])
def test_corrected_bias_zeroes_mean_error(with_bias):
    X, W, Wq, b = data()
    b = b if with_bias else None
    b0 = b if b is not None else torch.zeros(16)
    b2 = corrected_bias(W, Wq, X.mean(dim=0), b)
    assert b2.shape == (16,) and b2.dtype == torch.float32
    m = X.double().mean(dim=0)
    want = m @ W.double().T + b0.double()  # E[X] W^T + b
    got = m @ Wq.double().T + b2.double()  # E[X] Wq^T + b'
    assert torch.allclose(got, want, atol=1e-4)
    mean_err = ((X @ Wq.T + b2) - (X @ W.T + b0)).mean(dim=0)
    before = ((X @ Wq.T + b0) - (X @ W.T + b0)).mean(dim=0)
    assert float(mean_err.abs().max()) < 1e-3 < float(before.abs().max())


def test_corrected_bias_errors():
    X, W, Wq, b = data()
    with pytest.raises(BiasCorrectionError, match=r"x_mean must be \[32\]"):
        corrected_bias(W, Wq, torch.zeros(5), b)
    with pytest.raises(BiasCorrectionError, match="bias"):
        corrected_bias(W, Wq, X.mean(0), torch.zeros(3))
    with pytest.raises(ValueError, match="one shape"):
        corrected_bias(W, Wq[:3], X.mean(0), b)


def test_salient_rows_squared_error():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(30, 20, generator=g)
    Wq = W + 0.01 * torch.randn(30, 20, generator=g)
    Wq[[11, 2, 25]] += 1.0  # the three rows with the largest error
    assert salient_rows(W, Wq, None, 0.1).tolist() == [2, 11, 25]  # ceil(0.1 * 30) = 3
    assert salient_rows(W, Wq, None, 0.0).numel() == 0
    assert salient_rows(W, Wq, None, 0.0).dtype == torch.long
    assert salient_rows(W, Wq, None, 1.0).tolist() == list(range(30))


def test_salient_rows_uses_hessian():
    """Rows erring on a column the inputs weight heavily beat rows with larger but cheap errors."""
    W = torch.zeros(10, 8)
    Wq = W.clone()
    Wq[[1, 4], 0] = 0.5  # small error on the loud input 0
    Wq[[3, 7, 9], 5] = 2.0  # large error on the quiet input 5
    H = torch.diag(torch.tensor([100.0, 1, 1, 1, 1, 0.01, 1, 1]))
    assert salient_rows(W, Wq, H, 0.2).tolist() == [1, 4]
    assert set(salient_rows(W, Wq, None, 0.3).tolist()) == {3, 7, 9}


def test_row_errors_oracle():
    g = torch.Generator().manual_seed(2)
    W, Wq = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    A = torch.randn(5, 5, generator=g)
    H = A @ A.T
    E = (W - Wq).double()
    assert torch.allclose(row_errors(W, Wq, H).double(), torch.diag(E @ H.double() @ E.T), rtol=1e-4)


@settings(max_examples=40)
@given(out=st.integers(1, 40), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_salient_count_property(out, fraction, seed):
    g = torch.Generator().manual_seed(seed)
    W, Wq = torch.randn(out, 4, generator=g), torch.randn(out, 4, generator=g)
    idx = salient_rows(W, Wq, None, fraction)
    assert idx.numel() == math.ceil(round(fraction * out, 9))
    assert idx.tolist() == sorted(set(idx.tolist()))
    err = row_errors(W, Wq)
    rest = torch.ones(out, dtype=torch.bool)
    rest[idx] = False
    if idx.numel() and bool(rest.any()):
        assert float(err[idx].min()) >= float(err[rest].max())


def test_salient_errors():
    W = torch.randn(4, 4)
    with pytest.raises(SalientError, match="fraction"):
        salient_rows(W, W, None, 1.5)
    with pytest.raises(SalientError, match=r"H must be \[4, 4\]"):
        salient_rows(W, W, torch.eye(3), 0.5)
