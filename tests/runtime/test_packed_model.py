"""pack_model on a tiny random Llama: packed layers replace the fake-quant ones, logits stay close.

Oracle: the fake-quant model the runner produced. Packed weight-only layers decode bit-identical
weights, and W8A8 layers compute bit-identical int32 accumulators, so the packed model differs only by
fp32 rounding (summation order, ``acc * s_x * s_w`` vs a float matmul). A later per-token int8 (or KV
int4) quantizer can turn such a 1-ulp difference into one quantization step when a value sits on a
rounding edge, so logits are compared with a bound measured for this model (see each test) rather than
bit for bit; a plan without activation quantizers is held to fp32 summation noise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from mixq.algorithms.runner import quantize_model
from mixq.export.layers import quantized_layers
from mixq.model.packed import pack_model, packed_bytes
from mixq.model.plan_match import resolve
from mixq.model.qmodules import QuantLinear
from mixq.plan import LayerSpec, Options, Plan, Rule
from mixq.quant import QuantSpec
from mixq.quant.accounting import bit_count
from mixq.runtime.generate import greedy_tokens
from mixq.runtime.linear import PackedLinearW8A8, PackedLinearWeightOnly

Q = QuantSpec.parse
CALIB = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
TEST = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

MIXED = Plan((
    Rule("*.self_attn", LayerSpec(kv=Q("int4:token"))),
    Rule("*.mlp.*", LayerSpec(weights=Q("int4:g16:mse"))),
    Rule("*.self_attn.[qk]_proj", LayerSpec(weights=Q("int8:channel"), inputs=Q("int8:token"))),
    Rule("*.self_attn.v_proj", LayerSpec(weights=Q("nvfp4"), inputs=Q("int8"), static_inputs=True)),
    Rule("*.self_attn.o_proj", LayerSpec(weights=Q("int3:g16:asym"), options=Options(hadamard=32))),
))


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def quantized(plan: Plan) -> tuple[nn.Module, dict]:
    model = tiny_llama()
    resolved = resolve(plan, model)
    report = quantize_model(model, resolved, CALIB)
    return model, quantized_layers(model, resolved, report.scales)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TEST).logits


def test_weight_only_model_matches_to_fp32_rounding() -> None:
    model, layers = quantized(Plan.uniform(LayerSpec(weights=Q("int4:g16"))))
    packed = copy.deepcopy(model)
    kinds = pack_model(packed, layers)
    assert set(kinds.values()) == {"weight_only"} and len(kinds) == 14
    ref, got = logits(model), logits(packed)
    # measured: bit-identical on this model; only the fp32 summation order may differ
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_mixed_plan_packs_what_it_can() -> None:
    model, layers = quantized(MIXED)
    packed = copy.deepcopy(model)
    kinds = pack_model(packed, layers)
    for i in range(2):
        p = f"model.layers.{i}"
        assert kinds[f"{p}.self_attn.q_proj"] == kinds[f"{p}.self_attn.k_proj"] == "w8a8"
        assert kinds[f"{p}.mlp.up_proj"] == kinds[f"{p}.self_attn.o_proj"] == "weight_only"
        assert f"{p}.self_attn.v_proj" not in kinds  # nvfp4 + static int8 inputs: stays fake-quant
        assert isinstance(packed.get_submodule(f"{p}.self_attn.v_proj"), QuantLinear)
        assert isinstance(packed.get_submodule(f"{p}.self_attn.k_proj"), PackedLinearW8A8)
        assert packed.get_submodule(f"{p}.self_attn.k_proj").outputs == Q("int4:token")  # KV quantizer kept
        assert packed.get_submodule(f"{p}.self_attn.o_proj").hadamard == 32
    ref, got = logits(model), logits(packed)
    # int8 token / int4 KV quantizers can turn fp32 noise into one step on a rounding edge:
    # measured max |diff| 1.4e-7 of max |logit| here; bound 1e-3 leaves room for a few such flips
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_packing_frees_weights_and_counts_bytes() -> None:
    model, layers = quantized(Plan.uniform(LayerSpec(weights=Q("int4:g16"))))
    before = packed_bytes(model)
    old = model.get_submodule("model.layers.0.mlp.up_proj")
    pack_model(model, layers)
    assert "weight" not in dict(old.named_parameters())  # the discarded module no longer holds it
    after = packed_bytes(model)
    linear_fp32 = sum(l.weight.codes.numel() * 4 for l in layers.values())
    expect = sum(bit_count(l.weight.spec, l.weight.shape).bytes for l in layers.values())
    mods = [m for m in model.modules() if isinstance(m, PackedLinearWeightOnly)]
    held = sum(m.packed.numel() + m.scale.numel() * 4 for m in mods)
    assert held == expect  # codes at 4 bits + one fp32 scale per 16 values, as bit_count counts them
    luts = sum(m.lut.numel() * 4 + m.byte_lut.numel() * 4 for m in mods)
    assert before - after == linear_fp32 - held - luts


def test_greedy_generation_uses_the_cache_consistently() -> None:
    model, layers = quantized(Plan.uniform(LayerSpec(weights=Q("int4:g16"))))
    pack_model(model, layers)
    prompt = TEST[:1, :6]
    new = greedy_tokens(model, prompt, 8)
    assert new.shape == (1, 8)
    ids = prompt
    with torch.no_grad():  # the same tokens recomputed without a cache
        for _ in range(8):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids[:, 6:], new)
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        greedy_tokens(model, TEST, 2)


def test_w8a7_model_runs_on_onednn_and_matches_fp32_exact() -> None:
    """int7 token inputs: ``auto`` puts every W8A8 layer on oneDNN (prepacked weight only); its int32
    accumulators equal fp32_exact's, so the two packed models give the same logits bit for bit."""
    from mixq.runtime import tiles

    if not tiles.onednn_available():
        pytest.skip("oneDNN int8 linear not available")
    model, layers = quantized(Plan.uniform(LayerSpec(weights=Q("int8:channel"), inputs=Q("int7:token"))))
    auto, exact = copy.deepcopy(model), copy.deepcopy(model)
    kinds = pack_model(auto, layers)
    pack_model(exact, layers, w8a8_backend="fp32_exact")
    assert set(kinds.values()) == {"w8a8"} and len(kinds) == 14
    mods = [m for m in auto.modules() if isinstance(m, PackedLinearW8A8)]
    assert all(m.onednn is not None and m.weight_codes is None and m.route(1) == "onednn" for m in mods)
    ref, got = logits(model), logits(auto)
    assert torch.equal(got, logits(exact))
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()  # fp32 noise before token quantizers, as above
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    held = sum(m.opaque_bytes() + m.weight_scale.numel() * 4 for m in mods)
    expect = sum(bit_count(l.weight.spec, l.weight.shape).bytes for l in layers.values())
    assert held == expect  # one byte per weight (oneDNN's copy) + one fp32 scale per channel
