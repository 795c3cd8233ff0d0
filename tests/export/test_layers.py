"""Codes recovered from a fake-quantized model: exact for every algorithm, refused for weights off the grid.

The runner records the scales each weight was quantized with; ``quantized_layers`` turns the weights
back into codes, and ``fill`` rebuilds the fake-quant model from them and the float tensors. The
oracle is the quantized model itself: logits must be bit-identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from mixq.algorithms.runner import quantize_model
from mixq.export.layers import ExportError, fill, float_tensors, quantized_layers
from mixq.model.plan_match import resolve
from mixq.plan import LayerSpec, Options, Plan, Rule
from mixq.quant import QuantSpec, dequantize, fake_quantize, quantize
from mixq.quant.core import quantize_with_scales, requantize
from mixq.quant.granularity import Grouping
from mixq.quant.core import choose_scales

Q = QuantSpec.parse
CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
TEST = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TEST).logits


@pytest.mark.parametrize("spec", ["int4:g16:mse", "int3:g16:asym:mse", "mxfp4", "nvfp4", "fp8_e4m3:channel",
                                  "ternary:channel:mse", "uint4:g16:asymf:fp16", "nf4:g32"])
def test_codes_from_scales_decode_exactly(spec):
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    s = Q(spec)
    grouping = Grouping(tuple(W.shape), s.granularity)
    sc = choose_scales(grouping.to_groups(W), s, 0, "torch")
    Wq = fake_quantize(W, s)
    qt = quantize_with_scales(Wq, s, sc)
    assert torch.equal(dequantize(qt), Wq)
    assert torch.equal(qt.codes, quantize(W, s).codes)


def test_off_grid_weights_are_refused_with_the_index():
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    s = Q("int4:g16")
    Wq = fake_quantize(W, s).clone()
    Wq[2, 5] += 1e-3
    with pytest.raises(ValueError, match="flat index 69"):
        requantize(Wq, s)


def test_mse_scales_are_not_found_again_without_the_recorded_ones():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="not on the grid"):
        requantize(fake_quantize(W, "int3:g16:mse"), "int3:g16:mse")


PLAN = Plan([
    Rule("*.mlp.*", LayerSpec(weights=Q("int4:g16:mse"), algorithm="gptq")),
    Rule("*.self_attn.[qk]_proj", LayerSpec(weights=Q("int8:channel"), inputs=Q("int8:token"))),
    Rule("*.self_attn.v_proj", LayerSpec(weights=Q("nvfp4"), inputs=Q("int8"), static_inputs=True)),
    Rule("*.self_attn.o_proj", LayerSpec(weights=Q("mxfp4"), options=Options(hadamard=32))),
])


@pytest.fixture(scope="module")
def quantized():
    model = tiny_llama()
    source = copy.deepcopy(model)
    resolved = resolve(PLAN, model)
    report = quantize_model(model, resolved, CALIB)
    return source, model, resolved, report


def test_every_layer_is_recovered_and_the_model_rebuilt_bit_exactly(quantized):
    source, model, resolved, report = quantized
    layers = quantized_layers(model, resolved, report.scales)
    assert len(layers) == 14  # 2 blocks x 7 linears
    assert all(layer.weight is not None for layer in layers.values())
    v = layers["model.layers.0.self_attn.v_proj"]
    assert v.static_range is not None and v.inputs == Q("int8")
    assert layers["model.layers.1.self_attn.o_proj"].hadamard == 32
    tensors = float_tensors(model, layers)
    assert "model.layers.0.mlp.up_proj.weight" not in tensors
    assert not any(".inner." in k or k.endswith((".lo", ".hi", ".signs")) for k in tensors)
    rebuilt = fill(copy.deepcopy(source), tensors, layers, resolved)
    assert torch.equal(logits(rebuilt), logits(model))


def test_a_gptq_weight_without_its_scales_names_the_layer(quantized):
    _, model, resolved, _ = quantized
    with pytest.raises(ExportError, match=r"model\.layers\.0\.mlp\.\w+_proj .*no scales were recorded"):
        quantized_layers(model, resolved, {})


def test_fill_refuses_unknown_and_missing_tensors(quantized):
    source, model, resolved, report = quantized
    layers = quantized_layers(model, resolved, report.scales)
    tensors = float_tensors(model, layers)
    with pytest.raises(ExportError, match="does not have"):
        fill(copy.deepcopy(source), {**tensors, "extra.weight": torch.zeros(1)}, layers, resolved)
    partial = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    with pytest.raises(ExportError, match="lacks tensors.*model.norm.weight"):
        fill(copy.deepcopy(source), partial, layers, resolved)
