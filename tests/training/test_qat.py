"""QAT: straight-through and LSQ gradients, training, conversion that exports exactly, LoRA merging.

Oracles: the hand-written LSQ formulas, :func:`mixq.quant.fake_quantize` (the QAT forward at
initialization equals it bit for bit) and the export path (codes packed with the learned scales decode
to the converted weights, and a model rebuilt from them gives the QAT model's output).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mixq.export.layers import fill, float_tensors, quantized_layers
from mixq.model.plan_match import resolve
from mixq.model.qmodules import QuantLinear
from mixq.model.tree import weight_matrix
from mixq.plan import LayerSpec, Options, Plan, PlanError, Rule
from mixq.quant import QuantSpec, dequantize, fake_quantize
from mixq.quant.core import quantize_with_scales, requantize
from mixq.training.lsq import LSQQuantizer, STEQuantizer, lsq_grad_factor
from mixq.training.qat import (LoRALinear, QATLinear, convert, convert_with_scales, lora_qat, merge,
                              prepare_qat)

Q = QuantSpec.parse


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spec", ["int4:g16", "int4:g16:mse", "int3:g16:asym", "uint4:g16:asymf:fp16",
                                  "mxfp4", "nvfp4", "nf4:g32", "fp8_e4m3:channel", "ternary:channel:mse",
                                  "int4:b16x16"])
def test_initial_forward_is_fake_quantize_and_packs_with_its_scales(spec):
    W = torch.randn(32, 64, generator=gen(0))
    q = LSQQuantizer(spec, W)
    y = q(W)
    assert torch.equal(y, fake_quantize(W, spec, backend="torch"))
    assert torch.equal(dequantize(quantize_with_scales(y.detach(), spec, q.scales())), y)


def test_ste_gradient_is_identity_inside_the_range_and_zero_where_clipped():
    x = torch.linspace(-3, 3, 25, requires_grad=True)
    q = LSQQuantizer("int4", x.detach())
    with torch.no_grad():
        q.step.fill_(0.25)  # range [-8, 7] * 0.25 = [-2, 1.75]: both ends clip
    q(x).sum().backward()
    inside = (x.detach() / 0.25 >= -8) & (x.detach() / 0.25 <= 7)
    assert 0 < int(inside.sum()) < x.numel()
    assert torch.equal(x.grad, inside.float())


def test_lsq_step_gradient_matches_the_formula():
    x = torch.tensor([-2.3, -0.61, 0.0, 0.37, 0.9, 1.26, 5.0])
    q = LSQQuantizer("int4", x)
    s = 0.3
    with torch.no_grad():
        q.step.fill_(s)
    q(x).sum().backward()
    v = x / s
    inside = (v >= -8) & (v <= 7)
    per_elem = torch.where(inside, torch.round(v) - v, v.clamp(-8, 7))  # round(v) - v, or Q_N / Q_P
    g = 1 / math.sqrt(x.numel() * 7)
    assert lsq_grad_factor(x.numel(), Q("int4")) == pytest.approx(g)
    assert q.step.grad.item() == pytest.approx(g * float(per_elem.sum()), rel=1e-5)


def test_lsq_step_gradient_per_group_matches_the_formula():
    """Per group g: dL/ds_g = g_lsq * sum_i c_i * (round(v_i) - v_i inside, clamp(v_i) outside)."""
    W = torch.randn(4, 32, generator=gen(1))
    c = torch.randn(4, 32, generator=gen(2))
    q = LSQQuantizer("int4:g16", W)
    (q(W) * c).sum().backward()
    s = q.scales().scale.reshape(-1, 1)  # [8, 1]
    V, C = W.reshape(-1, 16) / s, c.reshape(-1, 16)
    Vc = V.clamp(-8, 7)
    inside = V == Vc
    expected = (torch.where(inside, torch.round(V) - V, Vc) * C).sum(1) * lsq_grad_factor(16, Q("int4:g16"))
    torch.testing.assert_close(q.step.grad, expected, rtol=1e-4, atol=1e-7)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


PLAN = Plan((
    Rule("up", LayerSpec(weights=Q("int4:g8"), inputs=Q("int8:token"))),
    Rule("down", LayerSpec(weights=Q("int3:g16:asym:mse"), inputs=Q("int8"), static_inputs=True)),
))


def teacher_data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    teacher = TinyNet()
    X = torch.randn(256, 16, generator=gen(3))
    with torch.no_grad():
        return X, teacher(X)


def train(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained():
    X, Y = teacher_data()
    torch.manual_seed(1)
    source = TinyNet()
    model = copy.deepcopy(source)
    resolved = resolve(PLAN, model)
    prepare_qat(model, resolved)
    losses = train(model, X, Y, steps=40)
    return source, model, resolved, losses, X


def test_qat_training_reduces_the_loss_and_moves_the_steps(trained):
    source, model, _, losses, _ = trained
    assert isinstance(model.up, QATLinear) and isinstance(model.up.weights, LSQQuantizer)
    assert losses[-1] < 0.5 * losses[0]
    init = LSQQuantizer(model.up.weights.spec, weight_matrix(source.up))
    assert model.up.weights.step.shape == init.step.shape == (64,)
    assert not torch.equal(model.up.weights.step, init.step)
    assert model.down.inputs.step.requires_grad and bool(model.down.inputs.initialized)


def test_convert_puts_weights_on_the_grid_and_keeps_the_output(trained):
    source, model, resolved, _, X = trained
    qat_model = copy.deepcopy(model)
    with torch.no_grad():
        expected = qat_model(X)
    converted, scales = convert_with_scales(qat_model)
    assert isinstance(converted.up, QuantLinear) and isinstance(converted.up.inner, nn.Linear)
    assert not any(isinstance(m, QATLinear) for m in converted.modules())
    with torch.no_grad():
        assert torch.equal(converted(X), expected)
    for name, spec in (("up", Q("int4:g8")), ("down", Q("int3:g16:asym:mse"))):
        W = weight_matrix(converted.get_submodule(name).inner)
        assert torch.equal(dequantize(quantize_with_scales(W, spec, scales[name])), W)
    # The export path packs the learned weights and rebuilds the same model.
    layers = quantized_layers(converted, resolved, scales)
    rebuilt = fill(copy.deepcopy(source), float_tensors(converted, layers), layers, resolved)
    with torch.no_grad():
        assert torch.equal(rebuilt(X), expected)


def test_fixed_rule_scales_convert_to_weights_that_requantize():
    X, Y = teacher_data()
    model = TinyNet()
    plan = Plan((Rule("*", LayerSpec(weights=Q("int4:g8"))),))
    prepare_qat(model, plan, learn_scales=False)
    assert isinstance(model.up.weights, STEQuantizer)
    losses = train(model, X, Y, steps=20)
    assert losses[-1] < losses[0]
    with torch.no_grad():
        expected = model(X)
    convert(model)
    assert isinstance(model.up, nn.Linear)
    for layer in (model.up, model.down):
        requantize(weight_matrix(layer), "int4:g8")
    with torch.no_grad():
        assert torch.equal(model(X), expected)


def test_conv_layers_train_and_convert():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    prepare_qat(model, Plan((Rule("*", LayerSpec(weights=Q("int8:channel"))),)))
    x = torch.randn(2, 3, 6, 6, generator=gen(4))
    out = model(x)
    out.square().mean().backward()
    assert model[0].inner.weight.grad is not None and model[0].weights.step.grad is not None
    with torch.no_grad():
        expected = model(x)
    model, scales = convert_with_scales(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert set(scales) == {"0", "2"}


def test_gpt2_conv1d_layers_and_a_tied_head_export_exactly():
    from transformers import GPT2Config, GPT2LMHeadModel

    from mixq.model.quantizers import untie_lm_head

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    source = copy.deepcopy(model)
    plan = Plan((Rule("*.mlp.*", LayerSpec(weights=Q("int4:g16"), inputs=Q("int8:token"))),
                 Rule("*.attn.c_attn", LayerSpec(weights=Q("mxfp4"))),
                 Rule("lm_head", LayerSpec(weights=Q("nvfp4")))))
    resolved = resolve(plan, model)
    prepare_qat(model, resolved)
    assert model.lm_head.inner.weight is not model.transformer.wte.weight  # untied before training
    ids = torch.randint(0, 64, (2, 16), generator=gen(5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model, scales = convert_with_scales(model)
    layers = quantized_layers(model, resolved, scales)
    untie_lm_head(source, resolved)  # what a saved checkpoint's config (tie_word_embeddings=False) rebuilds
    rebuilt = fill(source, float_tensors(model, layers), layers, resolved)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
        assert torch.equal(rebuilt(input_ids=ids).logits, expected)


def test_lora_qat_trains_only_the_factors_and_merges_to_the_same_output():
    X, Y = teacher_data()
    torch.manual_seed(2)
    model = TinyNet()
    plan = Plan((Rule("up", LayerSpec(weights=Q("int4:g8"), inputs=Q("int8:token"))),
                 Rule("down", LayerSpec(weights=Q("mxfp4")))))
    W_up = weight_matrix(model.up)
    lora_qat(model, plan, rank=4, alpha=8)
    assert isinstance(model.up, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"up.A", "up.B", "down.A", "down.B"}
    assert torch.equal(weight_matrix(model.up.base.inner), fake_quantize(W_up, "int4:g8"))
    losses = train(model, X, Y, steps=30)
    assert losses[-1] < losses[0]
    assert model.up.B.abs().sum() > 0
    with torch.no_grad():
        unmerged = model(X)
    merge(model)
    assert isinstance(model.down, nn.Linear) and isinstance(model.up, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-5)


def test_unsupported_plans_and_specs_are_refused():
    with pytest.raises(PlanError, match="Hadamard"):
        rotated = LayerSpec(weights=Q("int4:g8"), options=Options(hadamard=8))
        prepare_qat(TinyNet(), Plan((Rule("up", rotated),)))
    with pytest.raises(PlanError, match="static"):
        prepare_qat(TinyNet(), Plan((Rule("up", LayerSpec(weights=Q("int4:g8"), inputs=Q("int8:asym"),
                                                          static_inputs=True)),)))
    with pytest.raises(ValueError, match="stochastic"):
        LSQQuantizer("int4:g8:sr", torch.randn(4, 16))
    with pytest.raises(ValueError, match="per tensor"):
        LSQQuantizer("int4:g8")
