"""compressed-tensors export on a tiny random Llama: scheme mapping, refusals, atomicity, reloads.

mixq's own reader must give bit-identical logits for every expressible scheme. transformers +
compressed-tensors (CPU, fp32) must too wherever their numerics coincide with mixq's: int weights
(any supported width, sym, packed or int8), fp8 weights with fp8 dynamic per-token or static
per-tensor inputs, tensor scales folded into int scales. Known differences, asserted as such:
int8 dynamic per-token inputs (compressed-tensors' scale is amax/127.5, mixq's amax/127).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mixq.algorithms.runner import quantize_model
from mixq.export.compressed import (UnsupportedSchemeError, is_compressed_tensors_folder, read_compressed_tensors,
                                    save_compressed_tensors)
from mixq.export.ct_schemes import ct_scheme, pack_int32, unpack_int32
from mixq.export.layers import QuantizedLayer, quantized_layers
from mixq.model.plan_match import resolve
from mixq.model.run_folder import OutputExistsError
from mixq.plan import LayerSpec, Options, Plan, Rule
from mixq.quant import QuantSpec, quantize

Q = QuantSpec.parse
CALIB = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
TEST = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=256, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def export(base, plan: Plan, out):
    m = copy.deepcopy(base)
    resolved = resolve(plan, m)
    report = quantize_model(m, resolved, CALIB, batch_size=4)
    layers = quantized_layers(m, resolved, report.scales)
    save_compressed_tensors(m, layers, resolved, out)
    with torch.no_grad():
        ref = m(input_ids=TEST).logits
    return m, layers, ref


def logits(model):
    with torch.no_grad():
        return model(input_ids=TEST).logits


def uniform(weights: str, inputs: str | None = None, static: bool = False) -> Plan:
    return Plan.uniform(LayerSpec(weights=Q(weights), inputs=Q(inputs) if inputs else None, static_inputs=static))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_int32_packing_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, 77), generator=g)
    mine = pack_int32(q + (1 << (bits - 1)), bits)
    assert torch.equal(mine, pack_to_int32(q.to(torch.int8), bits))
    assert torch.equal(unpack_int32(mine, bits, 77) - (1 << (bits - 1)), q)
    assert torch.equal(unpack_from_int32(mine, bits, torch.Size([5, 77])).long(), q)


EXACT_IN_TRANSFORMERS = {
    "int4_g16": uniform("int4:g16"),
    "int3_channel": uniform("int3:channel"),
    "int8_channel": uniform("int8:channel"),
    "int4_g16_tensor_scale": uniform("int4:g16:ts"),
    "fp8_channel_token": uniform("fp8_e4m3:channel", "fp8_e4m3:token"),
    "fp8_static": uniform("fp8_e4m3", "fp8_e4m3", static=True),
    "int8_static": uniform("int8:channel", "int8", static=True),
}
MIXQ_ONLY = {  # written in the canonical layout; transformers 5.24 / compressed-tensors 0.20 cannot reload them
    "int3_g16_asym": uniform("int3:g16:asym"),  # ct's meta compression leaves the packed zero point unpacked
    "uint4_channel_asym": uniform("uint4:channel:asym"),
    "mxfp4": uniform("mxfp4"),  # fp4 weights are decompressed to bf16: an fp32 model cannot run them
    "nvfp4": uniform("nvfp4"),
}


@pytest.mark.parametrize("name", sorted(EXACT_IN_TRANSFORMERS) + sorted(MIXQ_ONLY))
def test_mixq_reader_is_bit_identical(base, tmp_path, name):
    plan = {**EXACT_IN_TRANSFORMERS, **MIXQ_ONLY}[name]
    _, layers, ref = export(base, plan, tmp_path / "ct")
    assert is_compressed_tensors_folder(tmp_path / "ct")
    back = read_compressed_tensors(tmp_path / "ct")
    assert torch.equal(logits(back.model), ref)
    for layer_name, layer in layers.items():
        got = back.layers[layer_name].weight
        assert torch.equal(got.dequantize(), layer.weight.dequantize())


@pytest.mark.parametrize("name", sorted(EXACT_IN_TRANSFORMERS))
def test_transformers_reload_is_exact(base, tmp_path, name):
    _, _, ref = export(base, EXACT_IN_TRANSFORMERS[name], tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert torch.equal(logits(hf), ref)


def test_w8a8_dynamic_int8_differs_only_by_the_scale_convention(base, tmp_path):
    _, layers, ref = export(base, uniform("int8:channel", "int8:token"), tmp_path / "ct")
    meta = json.loads((tmp_path / "ct" / "mixq.json").read_text())
    assert not any(v["exact_in_transformers"] for v in meta["layers"].values())
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "int-quantized"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    diff = (logits(hf) - ref).abs().max().item()
    # amax/127.5 vs amax/127 moves each input code by at most one step: small but not zero
    assert 0 < diff < 0.05 * ref.abs().max().item()


def test_mixed_plan_config_groups(base, tmp_path):
    plan = Plan((Rule("lm_head", LayerSpec.keep()), Rule("model.layers.1.mlp.down_proj", LayerSpec.keep()),
                 Rule("*o_proj", LayerSpec(weights=Q("fp8_e4m3:channel"), inputs=Q("fp8_e4m3:token"))),
                 Rule("*self_attn*", LayerSpec(weights=Q("int8:channel"))),
                 Rule("*mlp*", LayerSpec(weights=Q("int4:g32")))))
    _, layers, ref = export(base, plan, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and qc["quant_method"] == "compressed-tensors"
    formats = {g["format"]: sorted(g["targets"]) for g in qc["config_groups"].values()}
    assert set(formats) == {"float-quantized", "naive-quantized", "pack-quantized"}
    assert "model.layers.1.mlp.down_proj" not in sum(formats.values(), [])
    assert formats["float-quantized"] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert torch.equal(logits(read_compressed_tensors(tmp_path / "ct").model), ref)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert torch.equal(logits(hf), ref)


def test_scheme_mapping():
    W = torch.randn(32, 64)

    def scheme(w: str, inputs: str | None = None, static: bool = False):
        rng = (torch.full((64,), -1.0), torch.ones(64)) if static else None
        return ct_scheme(QuantizedLayer("x", quantize(W, Q(w)), Q(inputs) if inputs else None, rng))

    s = scheme("int4:g16")
    assert s["format"] == "pack-quantized" and s["weights"]["strategy"] == "group" and s["weights"]["group_size"] == 16
    assert scheme("int8:channel", "int8:token")["format"] == "int-quantized"
    assert scheme("int8:channel", "int8:token")["exact"] is False
    assert scheme("fp8_e4m3:channel", "fp8_e4m3:token")["format"] == "float-quantized"
    assert scheme("fp8_e4m3:b16x16")["weights"]["block_structure"] == [16, 16]
    assert scheme("nvfp4")["format"] == "nvfp4-pack-quantized" and scheme("nvfp4")["exact"] is False
    assert scheme("mxfp4")["format"] == "mxfp4-pack-quantized"
    for spec, why in [("ternary:channel", "ternary"), ("int4:g16:asymf", "asymf"), ("fp6_e2m3:g16", "e2m3"),
                      ("int4:channel@1", "input-channel"), ("nf4:g16", "nf4"), ("int4:b16x16", "2-D")]:
        reason = scheme(spec)
        assert isinstance(reason, str) and why in reason, (spec, reason)
    assert "min-max" in scheme("int8:channel", "int8:token:mse")
    assert "asymmetric" in scheme("int8:channel", "int8:token:asym")


def test_refusal_lists_every_layer_and_writes_nothing(base, tmp_path):
    plan = Plan((Rule("lm_head", LayerSpec.keep()),
                 Rule("*q_proj", LayerSpec(weights=Q("ternary:channel"))),
                 Rule("*down_proj", LayerSpec(weights=Q("int4:g16"), options=Options(hadamard=True))),
                 Rule("*", LayerSpec(weights=Q("int4:g16")))))
    m = copy.deepcopy(base)
    resolved = resolve(plan, m)
    report = quantize_model(m, resolved, CALIB, batch_size=4)
    layers = quantized_layers(m, resolved, report.scales)
    with pytest.raises(UnsupportedSchemeError) as err:
        save_compressed_tensors(m, layers, resolved, tmp_path / "ct")
    assert set(err.value.reasons) == {f"model.layers.{i}.{p}" for i in (0, 1)
                                      for p in ("self_attn.q_proj", "mlp.down_proj")}
    assert "Hadamard" in err.value.reasons["model.layers.0.mlp.down_proj"]
    assert "ternary" in str(err.value)
    assert not (tmp_path / "ct").exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_and_overwrite_replaces(base, tmp_path):
    out = tmp_path / "ct"
    m, layers, _ = export(base, uniform("int4:g16"), out)
    resolved = resolve(uniform("int4:g16"), copy.deepcopy(base))
    with pytest.raises(OutputExistsError):
        save_compressed_tensors(m, layers, resolved, out)
    save_compressed_tensors(m, layers, resolved, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]
    assert not is_compressed_tensors_folder(tmp_path)


def test_truncated_or_corrupt_checkpoint_is_an_export_error_naming_the_file(base, tmp_path):
    from mixq.export.layers import ExportError

    export(base, uniform("int4:g16"), tmp_path / "ct")
    weights = tmp_path / "ct" / "model.safetensors"
    data = weights.read_bytes()
    flipped = bytearray(data)
    flipped[-7] ^= 0x10
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ExportError, match=r"model\.safetensors: SHA-256 differs"):
        read_compressed_tensors(tmp_path / "ct")
    weights.write_bytes(data[:-100])
    with pytest.raises(ExportError, match=r"model\.safetensors: \d+ bytes, the manifest says \d+ \(truncated"):
        read_compressed_tensors(tmp_path / "ct")
    (tmp_path / "ct" / "mixq.json").unlink()
    with pytest.raises(ExportError, match="mixq.json"):
        read_compressed_tensors(tmp_path / "ct")
