"""HessianAccumulator and layer_loss against their definitions; rtn against fake_quantize."""

from __future__ import annotations

import pytest
import torch

from mixq.algorithms.hessian import HessianAccumulator, HessianError, layer_loss
from mixq.algorithms.rtn import WeightResult, rtn
from mixq.quant import fake_quantize


def test_accumulator_equals_two_over_n_xtx():
    torch.manual_seed(0)
    parts = [torch.randn(3, 7, 16), torch.randn(5, 16), torch.randn(2, 2, 4, 16).to(torch.bfloat16)]
    acc = HessianAccumulator(16)
    for p in parts:
        acc.add(p)
    X = torch.cat([p.reshape(-1, 16).double() for p in parts])  # [n, in]
    expect = 2.0 / X.shape[0] * X.T @ X
    assert acc.nsamples == X.shape[0] == 21 + 5 + 16
    assert acc.H.dtype == torch.float32 and acc.H.shape == (16, 16)
    torch.testing.assert_close(acc.H.double(), expect, rtol=1e-5, atol=1e-5)


def test_accumulator_empty_and_bad_inputs():
    acc = HessianAccumulator(4)
    assert torch.equal(acc.H, torch.zeros(4, 4)) and acc.nsamples == 0
    with pytest.raises(HessianError, match=r"\[\.\.\., 4\].*\(2, 5\)"):
        acc.add(torch.randn(2, 5))
    with pytest.raises(HessianError, match="floating-point"):
        acc.add(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError):
        HessianAccumulator(0)


def test_layer_loss_is_the_output_error():
    """(2/n) ||X (W - Wq)^T||^2 = tr((W - Wq) H (W - Wq)^T) with H = (2/n) X^T X."""
    torch.manual_seed(1)
    X, W = torch.randn(200, 24), torch.randn(10, 24)
    Wq = fake_quantize(W, "int3:channel")
    acc = HessianAccumulator(24)
    acc.add(X)
    expect = 2.0 / 200 * ((X.double() @ (W - Wq).double().T) ** 2).sum().item()
    assert layer_loss(W, Wq, acc.H) == pytest.approx(expect, rel=1e-5)
    assert layer_loss(W, W, acc.H) == 0.0
    with pytest.raises(HessianError, match="H must be"):
        layer_loss(W, Wq, torch.eye(5))


def test_rtn_is_fake_quantize():
    torch.manual_seed(2)
    W, X = torch.randn(32, 64), torch.randn(100, 64)
    H = 2.0 / 100 * X.T @ X
    for spec in ["int4:g32", "mxfp4", "nvfp4", "int4:g32:asym:mse"]:
        r = rtn(W, spec, H)
        assert isinstance(r, WeightResult)
        assert torch.equal(r.weight, fake_quantize(W, spec))
        assert r.error == pytest.approx(((W - r.weight) ** 2).sum().item(), rel=1e-6)
        assert r.loss == pytest.approx(layer_loss(W, r.weight, H))
        assert r.loss > 0
    r = rtn(W.half(), "int8:channel")
    assert r.loss is None and r.weight.dtype == torch.float32
