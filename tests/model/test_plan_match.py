"""Matching a plan against a tiny random Llama: rows, up-front errors, warnings, notes, honest bits.

The model: hidden 64, intermediate 128, 4 heads of 16, 2 KV heads (K/V width 32), 2 layers, vocab
128, tied embeddings. Per layer the linears are q, o [64, 64]; k, v [32, 64]; gate, up [128, 64];
down [64, 128] (36864 weights); the LM head is [128, 64].
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mixq.algorithms.runner import quantize_model
from mixq.model.plan_match import count_bits, resolve
from mixq.plan import LayerSpec, Options, Plan, PlanError, Rule
from mixq.quant import QuantSpec

Q = QuantSpec.parse
PROJ = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
        "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
        "mlp.down_proj": (64, 128)}


def tiny_llama(tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_rows_for_every_linear(model):
    r = resolve(Plan.uniform(LayerSpec(weights=Q("int4:g64"))), model)
    expected = {f"model.layers.{i}.{p}": s for i in range(2) for p, s in PROJ.items()}
    expected["lm_head"] = (128, 64)
    assert {row.name: row.shape for row in r.layers} == expected
    assert all(row.kind == "linear" for row in r.layers)
    rows = r.by_name()
    assert rows["lm_head"].spec.is_keep and rows["lm_head"].rule == 0 and not rows["lm_head"].quantized
    assert rows["model.layers.1.mlp.down_proj"].rule == 1 and rows["model.layers.1.mlp.down_proj"].quantized
    assert r.warnings == ()
    table = r.table()
    assert table[0]["shape"] == [64, 64] and table[0]["spec"] == "int4:g64 rtn"


def test_unmatched_modules_are_kept(model):
    r = resolve(Plan((Rule("*.q_proj", LayerSpec(weights=Q("int8:channel"))),)), model)
    quantized = sorted(row.name for row in r.layers if row.quantized)
    assert quantized == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert r.by_name()["model.layers.0.mlp.up_proj"].rule is None


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_group_size_error_names_layer_and_shape_before_calibration():
    m = tiny_llama()
    before = _weights(m)
    # only down_proj has 128 inputs: g48 divides neither 64 nor 128, and the first row is q_proj
    plan = Plan.uniform(LayerSpec(weights=Q("int4:g48"), algorithm="gptq"))
    with pytest.raises(PlanError, match=r"model\.layers\.0\.self_attn\.q_proj \(weight \[64, 64\]\).*48"):
        resolve(plan, m)
    # the runner with no calibration data reports the shape error, not the missing data
    with pytest.raises(PlanError, match=r"q_proj \(weight \[64, 64\]\)"):
        quantize_model(m, plan, None)
    plan = Plan((Rule("*.down_proj", LayerSpec(weights=Q("int4:g96"), algorithm="gptq")),))
    with pytest.raises(PlanError, match=r"model\.layers\.0\.mlp\.down_proj \(weight \[64, 128\]\)"):
        quantize_model(m, plan, None)
    after = _weights(m)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was touched


def test_input_group_error(model):
    plan = Plan.uniform(LayerSpec(weights=Q("int8:channel"), inputs=Q("int8:g48")))
    with pytest.raises(PlanError, match=r"q_proj \(weight \[64, 64\]\)"):
        resolve(plan, model)


def test_hadamard_block_checked(model):
    with pytest.raises(PlanError, match=r"layers\.0\.self_attn\.q_proj: Hadamard block 128 .* 64 inputs"):
        resolve(Plan.uniform(LayerSpec(weights=Q("int4:g64"), options=Options(hadamard=128))), model)
    r = resolve(Plan((Rule("*.down_proj", LayerSpec(weights=Q("int4:g64"), options=Options(hadamard=128))),
                      Rule("*_proj", LayerSpec(weights=Q("int4:g32"), options=Options(hadamard=-1))))), model)
    rows = r.by_name()
    assert rows["model.layers.0.mlp.down_proj"].hadamard == 128
    assert rows["model.layers.0.self_attn.q_proj"].hadamard == 32  # -1: the weight spec's group size
    assert rows["lm_head"].hadamard == 0
    with pytest.raises(PlanError, match="power-of-two group"):
        resolve(Plan.uniform(LayerSpec(weights=Q("int8:channel"), options=Options(hadamard=-1))), model)


def test_unmatched_rule_warning_with_close_names(model):
    plan = Plan((Rule("model.layers.*.self_atn.q_proj", LayerSpec.keep()),
                 Rule("*.mlp.*", LayerSpec(weights=Q("int4:g64"))),
                 Rule("re:encoder\\..*", LayerSpec(weights=Q("int4:g64")))))
    r = resolve(plan, model)
    assert len(r.warnings) == 2
    assert "'model.layers.*.self_atn.q_proj' matched no module" in r.warnings[0]
    assert "close names" in r.warnings[0] and "self_attn.q_proj" in r.warnings[0]
    assert "encoder" in r.warnings[1]
    # a rule shadowed entirely by an earlier one matches nothing either
    shadow = Plan((Rule("*", LayerSpec.keep()), Rule("*.q_proj", LayerSpec(weights=Q("int4:g64")))))
    assert len(resolve(shadow, model).warnings) == 1


def test_tied_lm_head_notes():
    m = tiny_llama(tie=True)
    kept = resolve(Plan.uniform(LayerSpec(weights=Q("int4:g64"))), m).by_name()["lm_head"]
    assert kept.notes and "kept" in kept.notes[0]
    quant = resolve(Plan.uniform(LayerSpec(weights=Q("int4:g64")), keep=()), m).by_name()["lm_head"]
    assert quant.quantized and "untied" in quant.notes[0] and "embed_tokens" in quant.notes[0]
    untied = resolve(Plan.uniform(LayerSpec(weights=Q("int4:g64")), keep=()), tiny_llama(tie=False))
    assert untied.by_name()["lm_head"].notes == ()
    assert all(not row.notes for row in untied.layers)


def test_kv_rows(model):
    r = resolve(Plan.uniform(LayerSpec(weights=Q("int4:g64"), kv=Q("int8:g16"))), model)
    att = [row for row in r.layers if row.kind == "attention"]
    assert [row.name for row in att] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(row.spec == LayerSpec(kv=Q("int8:g16")) and row.shape == (32, 64) and row.quantized
               for row in att)
    assert all(row.spec.kv is None for row in r.layers if row.kind == "linear")  # kv lives on attention rows
    # only attention modules a kv rule matches
    one = resolve(Plan((Rule("model.layers.1.self_attn", LayerSpec(kv=Q("int8:token"))),)), model)
    assert [row.name for row in one.layers if row.kind == "attention"] == ["model.layers.1.self_attn"]
    assert one.warnings == ()
    assert not any(row.kind == "attention" for row in resolve(Plan.uniform(LayerSpec(weights=Q("int4"))),
                                                                model).layers)
    # a kv spec on a rule that only linears take is not silently dropped
    for pattern in ("*_proj", "*.self_attn.*"):
        r = resolve(Plan((Rule(pattern, LayerSpec(weights=Q("int4:g64"), kv=Q("int8:token"))),)), model)
        assert not any(row.kind == "attention" for row in r.layers)
        assert len(r.warnings) == 1 and "KV-cache spec" in r.warnings[0] and pattern in r.warnings[0]
    with pytest.raises(PlanError, match=r"KV cache of model\.layers\.0\.self_attn \(K/V width 32\)"):
        resolve(Plan.uniform(LayerSpec(kv=Q("int8:g24"))), model)


def test_input_quantization_only_on_linears():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4))
    r = resolve(Plan.uniform(LayerSpec(weights=Q("int8:channel")), keep=()), conv)
    assert [(row.name, row.kind, row.shape) for row in r.layers] == [("0", "conv", (8, 27)),
                                                                     ("2", "linear", (4, 128))]
    with pytest.raises(PlanError, match="layer 0: input quantization"):
        resolve(Plan.uniform(LayerSpec(weights=Q("int8:channel"), inputs=Q("int8:token")), keep=()), conv)


# --- honest bits ---------------------------------------------------------------------------------

PER_LAYER = sum(o * i for o, i in PROJ.values())  # 36864
HEAD = 128 * 64


def test_count_bits_uniform(model):
    bits = count_bits(resolve(Plan.uniform(LayerSpec(weights=Q("int4:g64"))), model))
    assert PER_LAYER == 36864
    assert bits["quantized_params"] == 2 * PER_LAYER and bits["params"] == 2 * PER_LAYER + HEAD
    assert bits["quantized_bits_per_weight"] == pytest.approx(4 + 32 / 64)  # fp32 scale per 64 weights
    total = 2 * PER_LAYER * 4.5 + HEAD * 16
    assert bits["bits_per_weight"] == pytest.approx(total / (2 * PER_LAYER + HEAD))
    asym = count_bits(resolve(Plan.uniform(LayerSpec(weights=Q("int4:g64:asym"))), model))
    assert asym["quantized_bits_per_weight"] == pytest.approx(4 + (32 + 4) / 64)  # plus a 4-bit zero point


def test_count_bits_mixed_by_hand(model):
    plan = Plan((Rule("*.q_proj", LayerSpec(weights=Q("int4:g64"))),
                 Rule("*.down_proj", LayerSpec(weights=Q("int8:channel"))),
                 Rule("*.up_proj", LayerSpec(weights=Q("mxfp4"))),
                 Rule("*.gate_proj", LayerSpec(inputs=Q("int8:token")))))  # inputs only: weights stay 16
    bits = count_bits(resolve(plan, model))
    q = 64 * 64 * (4 + 32 / 64)
    down = 64 * 128 * 8 + 64 * 32   # one fp32 scale per output row
    up = 128 * 64 * 4 + 128 * 2 * 8  # one e8m0 scale per 32 weights
    q_params = 2 * (64 * 64 + 64 * 128 + 128 * 64)
    assert bits["quantized_params"] == q_params
    assert bits["quantized_bits_per_weight"] == pytest.approx(2 * (q + down + up) / q_params)
    all_params = 2 * PER_LAYER + HEAD
    assert bits["bits_per_weight"] == pytest.approx((2 * (q + down + up) + (all_params - q_params) * 16)
                                                    / all_params)


def test_count_bits_salient_rows(model):
    plan = Plan((Rule("*.q_proj", LayerSpec(weights=Q("int4:g64"), options=Options(salient=0.1))),))
    bits = count_bits(resolve(plan, model))
    k = math.ceil(0.1 * 64)  # 7 rows of 64 in 16 bits, each with a 32-bit row index
    per = (64 - k) * 64 * 4.5 + k * 64 * 16 + k * 32
    assert bits["quantized_bits_per_weight"] == pytest.approx(per / (64 * 64))


def test_count_bits_nothing_quantized(model):
    bits = count_bits(resolve(Plan.uniform(LayerSpec(kv=Q("int8:token"))), model))
    assert bits["quantized_params"] == 0 and bits["quantized_bits_per_weight"] == 0.0
    assert bits["bits_per_weight"] == 16.0
