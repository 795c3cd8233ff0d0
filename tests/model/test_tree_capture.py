"""Module tree access (weights, inputs, get/set) and the capture hooks."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

from mixq.model.arch import ArchitectureError, arch_facts
from mixq.model.capture import StopForward, capture_block_inputs, record_inputs
from mixq.model.tree import (blocks, get_module, input_matrix, quantizable_modules, set_module,
                             set_weight_matrix, weight_matrix)


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2, vocab_size=128)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


class Vision(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.seq = nn.Conv1d(8, 4, 2)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(4, 2)


def test_quantizable_modules_kinds_and_order():
    torch.manual_seed(0)
    gpt2 = T.AutoModelForCausalLM.from_config(T.GPT2Config(n_embd=32, n_head=2, n_layer=1, vocab_size=64,
                                                           n_positions=16, bos_token_id=0, eos_token_id=0))
    names = list(quantizable_modules(gpt2))
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                     "transformer.h.0.mlp.c_proj", "lm_head"]
    assert isinstance(quantizable_modules(gpt2)["transformer.h.0.attn.c_attn"], Conv1D)
    assert list(quantizable_modules(Vision())) == ["stem", "dw", "seq", "head"]
    llama = quantizable_modules(tiny_llama())
    assert len(llama) == 2 * 7 + 1 and all(isinstance(m, nn.Linear) for m in llama.values())


@pytest.mark.parametrize("module", [nn.Linear(6, 4), Conv1D(4, 6), nn.Conv2d(3, 5, (2, 3)),
                                    nn.Conv1d(3, 5, 2), nn.Linear(6, 4).to(torch.bfloat16)])
def test_weight_matrix_round_trip(module):
    dtype = module.weight.dtype
    W = weight_matrix(module)
    assert W.dtype == torch.float32 and W.shape[0] == (module.weight.shape[1] if isinstance(module, Conv1D)
                                                        else module.weight.shape[0])
    W2 = torch.randn_like(W)
    set_weight_matrix(module, W2)
    assert module.weight.dtype == dtype
    assert torch.equal(weight_matrix(module), W2.to(module.weight.dtype).float())
    W2.zero_()  # weight_matrix is a copy, set_weight_matrix copies too
    assert weight_matrix(module).abs().sum() > 0
    with pytest.raises(ValueError, match="must be"):
        set_weight_matrix(module, torch.zeros(W.shape[1], W.shape[0] + 1))


def test_conv1d_weight_layout():
    m = Conv1D(4, 6)  # nf=4 outputs, nx=6 inputs, weight [6, 4]
    assert torch.equal(weight_matrix(m), m.weight.t())


def _oracle(module: nn.Module, x: torch.Tensor) -> None:
    """module(x) == input_matrix @ W^T + b, arranged back into the output layout."""
    X = input_matrix(module, x)
    W = weight_matrix(module)
    Y = X @ W.T + module.bias  # [n, out]
    y = module(x)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        y = y.movedim(1, -1)  # [N, *spatial_out, out]
    torch.testing.assert_close(Y, y.reshape(-1, y.shape[-1]), rtol=1e-5, atol=1e-5)


def test_input_matrix_linear_and_conv1d_hf():
    torch.manual_seed(0)
    _oracle(nn.Linear(6, 4), torch.randn(2, 3, 6))
    _oracle(Conv1D(4, 6), torch.randn(2, 3, 6))


@pytest.mark.parametrize("kw", [dict(kernel_size=3), dict(kernel_size=(3, 2), stride=2, padding=1),
                                dict(kernel_size=3, dilation=2, padding=(2, 1)),
                                dict(kernel_size=(2, 4), padding="same"),
                                dict(kernel_size=3, padding=1, padding_mode="reflect"),
                                dict(kernel_size=3, padding=2, padding_mode="circular", stride=(1, 2)),
                                dict(kernel_size=2, padding="valid", dilation=(1, 3))])
def test_input_matrix_conv2d(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, **kw)
    _oracle(conv, torch.randn(2, 3, 9, 10))
    assert input_matrix(conv, torch.randn(3, 9, 10)).shape[1] == 3 * conv.weight[0, 0].numel()  # unbatched


@pytest.mark.parametrize("kw", [dict(kernel_size=3), dict(kernel_size=2, stride=2, padding=1, dilation=2),
                                dict(kernel_size=4, padding="same", padding_mode="replicate")])
def test_input_matrix_conv1d(kw):
    torch.manual_seed(0)
    _oracle(nn.Conv1d(3, 5, **kw), torch.randn(2, 3, 11))


def test_input_matrix_grouped_conv_raises():
    with pytest.raises(ArchitectureError, match="per-group Hessian not supported.*groups=8"):
        input_matrix(nn.Conv2d(8, 8, 3, groups=8), torch.randn(1, 8, 5, 5))
    with pytest.raises(ArchitectureError, match="expected nn.Linear"):
        weight_matrix(nn.LayerNorm(4))


def test_get_and_set_module():
    model = tiny_llama()
    q = get_module(model, "model.layers.1.self_attn.q_proj")
    assert isinstance(q, nn.Linear) and get_module(model, "") is model
    new = nn.Linear(64, 64, bias=False)
    set_module(model, "model.layers.1.self_attn.q_proj", new)
    assert model.model.layers[1].self_attn.q_proj is new
    block = nn.Identity()
    set_module(model, "model.layers.0", block)
    assert model.model.layers[0] is block
    with pytest.raises(ArchitectureError, match="no module named 'model.layers.1.nope'"):
        get_module(model, "model.layers.1.nope")
    with pytest.raises(ArchitectureError, match="no module named"):
        set_module(model, "model.layers.1.nope", new)


def test_capture_block_inputs_llama():
    model = tiny_llama()
    names_blocks = blocks(model, arch_facts(model))
    _, block = names_blocks[1]
    ids = torch.randint(0, 128, (3, 7))
    outputs = []
    handle = block.register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    with capture_block_inputs(block) as calls, torch.no_grad():
        for _ in range(2):
            try:
                model(ids)
                raise AssertionError("forward should have stopped")
            except StopForward:
                pass
    assert len(calls) == 2
    args, kwargs = calls[0]
    assert args[0].shape == (3, 7, 64)
    assert "attention_mask" in kwargs
    cos, sin = kwargs["position_embeddings"]
    assert cos.shape[:2] == (3, 7) or cos.shape[:2] == (1, 7)
    assert len(block._forward_pre_hooks) == 0
    with torch.no_grad():  # re-running the block on the captured call reproduces the model's own call
        out = block(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    ref = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    torch.testing.assert_close(out, ref)


def test_capture_hook_removed_on_error():
    model = tiny_llama()
    block = model.model.layers[0]
    with pytest.raises(RuntimeError, match="boom"):
        with capture_block_inputs(block):
            assert len(block._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert len(block._forward_pre_hooks) == 0
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 4)))  # runs through without StopForward


def test_record_inputs():
    model = tiny_llama()
    mods = {n: m for n, m in quantizable_modules(model).items() if n.startswith("model.layers.0.")}
    seen: dict[str, list[tuple[int, ...]]] = {}
    def fn(name: str, x: torch.Tensor) -> None:
        seen.setdefault(name, []).append(tuple(x.shape))

    with record_inputs(mods, fn), torch.no_grad():
        model(torch.randint(0, 128, (2, 5)))
    assert set(seen) == set(mods)
    assert seen["model.layers.0.self_attn.q_proj"] == [(2, 5, 64)]
    assert seen["model.layers.0.mlp.down_proj"] == [(2, 5, 128)]
    assert all(len(m._forward_pre_hooks) == 0 for m in mods.values())
    lin = nn.Linear(3, 2)
    got = []
    with pytest.raises(KeyError):
        with record_inputs({"lin": lin}, lambda n, x: got.append(x)):
            lin(input=torch.ones(1, 3))  # keyword-only call passes its tensor keyword
            raise KeyError("x")
    assert len(got) == 1 and got[0].shape == (1, 3) and len(lin._forward_pre_hooks) == 0
