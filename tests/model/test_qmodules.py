"""Fake-quant module wrappers: activation quantizers, QuantLinear, wrap/unwrap, install_quantizers.

Oracles: a static per-tensor int8 quantizer is ``clamp(round(x / s), -128, 127) * s`` with
``s = absmax / 127`` of everything observed; the same equals ``fake_quantize`` of ``x`` with one extra
element holding the observed extreme (which fixes the per-tensor scale).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from mixq.algorithms.hadamard import block_hadamard, block_hadamard_matrix, random_signs
from mixq.model.plan_match import resolve
from mixq.model.qmodules import ActQuantizer, QuantLinear, inner, quantizers, set_enabled, unwrap, wrap
from mixq.model.quantizers import install_quantizers, untie_lm_head
from mixq.plan import LayerSpec, Options, Plan, Rule
from mixq.quant import QuantSpec, fake_quantize

Q = QuantSpec.parse


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_llama(tie: bool = True) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(cfg).eval()


# --- ActQuantizer ------------------------------------------------------------------------------

def observed(spec: str, batches: list[torch.Tensor]) -> ActQuantizer:
    q = ActQuantizer(Q(spec), static=True, channels=batches[0].shape[-1])
    q.observing = True
    for x in batches:
        assert torch.equal(q(x), x)  # disabled: the identity while observing
    q.observing = False
    q.enabled = True
    return q


def test_static_symmetric_equals_manual_oracle():
    xs = [torch.randn(3, 5, 16, generator=gen(i)) * (i + 1) for i in range(3)]
    q = observed("int8", xs)
    amax = max(x.abs().max() for x in xs)
    assert torch.equal(q.lo, torch.stack([x.reshape(-1, 16).amin(0) for x in xs]).amin(0))
    assert torch.equal(q.hi, torch.stack([x.reshape(-1, 16).amax(0) for x in xs]).amax(0))
    x2 = torch.randn(4, 16, generator=gen(9)) * 4  # some values beyond the range: clamped
    s = amax / 127
    expected = torch.clamp(torch.round(x2 / s), -128, 127) * s
    assert torch.allclose(q(x2), expected, rtol=0, atol=1e-6)
    assert (x2.abs() > amax).any()


def test_static_equals_fake_quantize_with_the_observed_extreme():
    xs = [torch.randn(8, 32, generator=gen(i)) for i in range(2)]
    for spec in ("int8", "int8:asym", "fp8_e4m3", "int4"):
        q = observed(spec, xs)
        lo, hi = float(q.lo.min()), float(q.hi.max())
        x2 = torch.rand(6, 32, generator=gen(5)) * (hi - lo) + lo  # inside the observed range
        ext = torch.tensor([lo, hi]) if spec.endswith("asym") else torch.tensor([max(-lo, hi)])
        oracle = fake_quantize(torch.cat([x2.flatten(), ext]), Q(spec))[: x2.numel()].reshape(x2.shape)
        assert torch.equal(q(x2), oracle), spec
        assert not torch.equal(q(x2), x2)


def test_static_rescale_divides_ranges():
    x = torch.randn(10, 8, generator=gen(0))
    s = torch.rand(8, generator=gen(1)) + 0.5
    a = observed("int8", [x])
    a.rescale(s)
    b = observed("int8", [x / s])
    assert torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)
    y = torch.randn(3, 8, generator=gen(2))
    assert torch.equal(a(y), b(y))


def test_static_errors():
    with pytest.raises(ValueError, match="per-tensor"):
        ActQuantizer(Q("int8:token"), static=True)
    q = ActQuantizer(Q("int8"), static=True, channels=4)
    q.enabled = True
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.randn(2, 4))


@pytest.mark.parametrize("spec", ["int8:token", "fp8_e4m3:token", "int4:g16", "mxfp4"])
def test_dynamic_equals_fake_quantize(spec):
    x = torch.randn(2, 7, 64, generator=gen(0))
    q = ActQuantizer(Q(spec))
    assert q(x) is x  # disabled
    q.enabled = True
    y = q(x)
    assert torch.equal(y, fake_quantize(x, Q(spec)))
    assert not torch.equal(y, x)


# --- QuantLinear -------------------------------------------------------------------------------

@pytest.mark.parametrize("block, seed", [(16, None), (64, None), (32, 3)])
def test_hadamard_wrapper_keeps_the_float_function(block, seed):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    x = torch.randn(5, 64, generator=gen(1))
    signs = random_signs(64, seed).float() if seed is not None else None
    M = block_hadamard_matrix(64, block, signs).float()  # [64, 64], y = x M^T
    rot = nn.Linear(64, 24)
    with torch.no_grad():
        rot.weight.copy_(lin.weight @ M.T)
        rot.bias.copy_(lin.bias)
    ql = QuantLinear(rot, hadamard=block, signs=signs)
    with torch.no_grad():
        assert torch.allclose(ql(x), lin(x), atol=1e-5)
        assert not torch.allclose(rot(x), lin(x), atol=1e-2)  # the rotation is real
        assert torch.allclose(block_hadamard(x, block, signs), x @ M.T, atol=1e-5)


def test_quant_linear_order_of_operations():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(3, 32, generator=gen(2))
    qi, qo = ActQuantizer(Q("int4:token")), ActQuantizer(Q("int8:token"))
    qi.enabled = qo.enabled = True
    ql = QuantLinear(lin, hadamard=32, inputs=qi, outputs=qo)
    with torch.no_grad():
        expected = fake_quantize(lin(fake_quantize(block_hadamard(x, 32), Q("int4:token"))), Q("int8:token"))
        assert torch.equal(ql(x), expected)


def test_wrap_and_unwrap():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)))
    first, last = model[0], model[2][0]
    w = wrap(model, "2.0", inputs=ActQuantizer(Q("int8:token")))
    assert isinstance(model[2][0], QuantLinear) and model[2][0].inner is last and inner(w) is last
    assert inner(first) is first
    out_q = ActQuantizer(Q("int8:token"))
    again = wrap(model, "2.0", outputs=out_q, hadamard=8)
    assert again is w and w.outputs is out_q and w.inputs is not None and w.hadamard == 8  # updated in place
    wrap(model, "0", hadamard=8)
    assert len(quantizers(model)) == 2
    set_enabled(model, True)
    assert all(q.enabled for q in quantizers(model))
    assert sorted(unwrap(model)) == ["0", "2.0"]
    assert model[0] is first and model[2][0] is last and quantizers(model) == []


# --- install_quantizers / untie_lm_head ----------------------------------------------------------

def test_install_online_hadamard_keeps_logits():
    m = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=gen(0))
    with torch.no_grad():
        ref = m(ids).logits
    plan = Plan((Rule("*.down_proj", LayerSpec(weights=Q("fp32"),
                                               options=Options(hadamard=128, hadamard_seed=1))),
                 Rule("*_proj", LayerSpec(weights=Q("fp32"), options=Options(hadamard=16)))))
    r = resolve(plan, m)
    W0 = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    install_quantizers(m, r, rotate_weights=True)
    wrapped = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert len(wrapped) == 14 and "lm_head" not in wrapped
    down = m.model.layers[0].mlp.down_proj
    assert down.hadamard == 128 and torch.equal(down.signs, random_signs(128, 1).float())
    M = block_hadamard_matrix(128, 128, down.signs).float()
    assert torch.allclose(down.inner.weight, W0 @ M.T, atol=1e-5)
    with torch.no_grad():
        out = m(ids).logits
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


def test_install_without_rotating_weights_leaves_them():
    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    plan = Plan.uniform(LayerSpec(weights=Q("int8:channel"), inputs=Q("int8"), static_inputs=True,
                                  kv=Q("int8:token"), options=Options(hadamard=32)))
    install_quantizers(m, resolve(plan, m), rotate_weights=False)
    after = {k.replace(".inner.", "."): v for k, v in m.state_dict().items()
             if not k.endswith((".lo", ".hi", ".signs"))}
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    layer = m.model.layers[0].self_attn
    assert layer.q_proj.inputs.static and layer.q_proj.inputs.lo.shape == (64,)
    assert layer.q_proj.outputs is None
    assert layer.k_proj.outputs.spec == Q("int8:token") and layer.v_proj.outputs.spec == Q("int8:token")
    assert layer.o_proj.outputs is None
    assert all(not q.enabled for q in quantizers(m))  # start disabled


def test_untie_lm_head():
    m = tiny_llama(tie=True)
    emb = m.model.embed_tokens.weight
    kept = resolve(Plan.uniform(LayerSpec(weights=Q("int4:g64"))), m)
    assert not untie_lm_head(m, kept) and m.lm_head.weight is emb
    quant = resolve(Plan.uniform(LayerSpec(weights=Q("int4:g64")), keep=()), m)
    assert untie_lm_head(m, quant)
    assert m.lm_head.weight is not emb and m.model.embed_tokens.weight is emb
    assert torch.equal(m.lm_head.weight, emb) and m.config.tie_word_embeddings is False
    with torch.no_grad():
        m.lm_head.weight.zero_()
    assert emb.abs().sum() > 0
    assert not untie_lm_head(m, quant)  # already untied
