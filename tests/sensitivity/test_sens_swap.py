"""layer_quantized: temporary weight swap and input fake-quantization, restored exactly."""

import pytest
import torch
from torch import nn

from mixq.model.swap import layer_quantized, quantize_input
from mixq.model.tree import weight_matrix
from mixq.quant import QuantSpec, fake_quantize


def test_weight_swapped_and_restored_bit_exact() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 4).to(torch.float16)
    before = lin.weight.detach().clone()
    W = torch.randn(4, 8)
    x = torch.randn(3, 8, dtype=torch.float16)
    with layer_quantized(lin, W):
        assert torch.equal(lin.weight, W.half())
        y = lin(x)
    assert torch.equal(y, nn.functional.linear(x, W.half(), lin.bias))
    assert torch.equal(lin.weight, before)


def test_restored_on_error_and_hook_removed() -> None:
    lin = nn.Linear(8, 4)
    before = lin.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with layer_quantized(lin, torch.zeros(4, 8), QuantSpec.parse("int4:token")):
            assert len(lin._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert torch.equal(lin.weight, before) and not lin._forward_pre_hooks


def test_inputs_fake_quantized_per_token() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(16, 4)
    spec = QuantSpec.parse("int4:token")
    x = torch.randn(2, 5, 16)
    with layer_quantized(lin, None, spec):
        y = lin(x)
    xq = fake_quantize(x.reshape(10, 16), spec).reshape(2, 5, 16)
    assert torch.equal(quantize_input(x, spec), xq)
    assert torch.allclose(y, nn.functional.linear(xq, lin.weight, lin.bias))
    assert not torch.allclose(y, lin(x))
    assert torch.equal(weight_matrix(lin), lin.weight)
