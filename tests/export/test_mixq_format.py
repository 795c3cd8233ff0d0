"""mixq's own checkpoint: a mixed plan saved and read back gives bit-identical logits; damage is caught.

The oracle is the quantized model itself (logits compared with ``torch.equal``), and the file's bytes
are accounted for exactly: safetensors header + packed parts (``packed_bytes``) + float tensors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from mixq.algorithms.runner import quantize_model
from mixq.export.layers import ExportError, float_tensors, quantized_layers
from mixq.export.manifest import FORMAT_VERSION, read_manifest
from mixq.export.mixq_format import MANIFEST, WEIGHTS, is_mixq_folder, read_mixq, save_mixq
from mixq.export.tensors import packed_bytes
from mixq.model.plan_match import resolve
from mixq.model.run_folder import OutputExistsError
from mixq.plan import LayerSpec, Options, Plan, Rule
from mixq.quant import QuantSpec, dequantize
from mixq.quant.accounting import bit_count

Q = QuantSpec.parse
CALIB = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
TEST = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
PLAN = Plan((
    Rule("model.layers.0.mlp.gate_proj", LayerSpec(weights=Q("int4:g16"), algorithm="gptq")),
    Rule("model.layers.0.mlp.up_proj", LayerSpec(weights=Q("int3:g16:asym:mse"))),
    Rule("model.layers.0.mlp.down_proj", LayerSpec(weights=Q("ternary:channel:mse"))),
    Rule("model.layers.1.mlp.gate_proj", LayerSpec(weights=Q("fp6_e2m3:g32"))),
    Rule("model.layers.1.mlp.up_proj", LayerSpec(weights=Q("mxfp4"))),
    Rule("model.layers.1.mlp.down_proj",
         LayerSpec(weights=Q("nvfp4"), options=Options(hadamard=32, hadamard_seed=7))),
    Rule("*.self_attn.[qk]_proj", LayerSpec(weights=Q("int8:channel"), inputs=Q("int8:token"))),
    Rule("*.self_attn.v_proj",
         LayerSpec(weights=Q("uint4:g16:asymf:fp16"), inputs=Q("int8"), static_inputs=True)),
    Rule("*.self_attn.o_proj", LayerSpec(weights=Q("nf4:g32"), options=Options(hadamard=32))),
    Rule("*.self_attn", LayerSpec(kv=Q("int8:token"))),
))


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TEST).logits


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A source folder, the quantized model, its layers, and the checkpoint written from it."""
    root = tmp_path_factory.mktemp("mixq_format")
    model = tiny_llama()
    copy.deepcopy(model).save_pretrained(root / "source")  # (a copy: saving sets the config's architectures)
    before = digests(root / "source")
    resolved = resolve(PLAN, model)
    report = quantize_model(model, resolved, CALIB)
    layers = quantized_layers(model, resolved, report.scales)
    out = save_mixq(model, layers, resolved, root / "out", source=root / "source", meta={"note": "test"})
    assert digests(root / "source") == before  # the source model is untouched
    return root, model, resolved, layers, out


def test_logits_and_codes_come_back_bit_identical(saved):
    _, model, _, layers, out = saved
    assert is_mixq_folder(out) and not is_mixq_folder(out.parent)
    exported = read_mixq(out)
    assert torch.equal(logits(exported.model), logits(model))
    assert set(exported.layers) == set(layers) and len(layers) == 14
    for name, layer in layers.items():
        back = exported.layers[name]
        assert (back.inputs, back.outputs, back.hadamard) == (layer.inputs, layer.outputs, layer.hadamard)
        assert torch.equal(back.weight.codes, layer.weight.codes) and back.weight.spec == layer.weight.spec
        assert torch.equal(dequantize(back.weight), dequantize(layer.weight))
        for a, b in [(back.static_range, layer.static_range), ((back.signs,), (layer.signs,))]:
            assert (a is None) == (b is None)
            if a is not None:
                assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))
    assert exported.layers["model.layers.1.mlp.down_proj"].signs is not None  # seeded rotation
    assert exported.layers["model.layers.0.self_attn.k_proj"].outputs == Q("int8:token")  # KV cache
    assert exported.meta["meta"] == {"note": "test"} and exported.meta["version"] == FORMAT_VERSION
    assert exported.resolved.plan == PLAN


def test_file_bytes_are_accounted_for(saved):
    _, model, _, layers, out = saved
    data = (out / WEIGHTS).read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    header.pop("__metadata__", None)
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    packed = sum(size for key, size in sizes.items() if ".weight." in key)
    expected_packed = sum(packed_bytes(q.weight.spec, q.weight.shape) for q in layers.values())
    accounted = sum(bit_count(q.weight.spec, q.weight.shape).bytes for q in layers.values())
    n_parts = sum(1 for key in sizes if ".weight." in key)
    floats = sum(t.numel() * t.element_size() for t in float_tensors(model, layers).values())
    extras = sum(size for key, size in sizes.items() if key.endswith((".lo", ".hi", ".signs")))
    assert packed == expected_packed and 0 <= packed - accounted < n_parts
    assert len(data) == 8 + header_len + packed + floats + extras  # nothing else in the file
    assert abs(len(data) - (8 + header_len + expected_packed + floats + extras)) <= 0.01 * len(data)


def test_existing_output_and_source_are_refused(saved, tmp_path):
    root, model, resolved, layers, out = saved
    with pytest.raises(OutputExistsError, match="exists"):
        save_mixq(model, layers, resolved, out)
    with pytest.raises(OutputExistsError, match="source"):
        save_mixq(model, layers, resolved, root / "source", source=root / "source", overwrite=True)
    again = save_mixq(model, layers, resolved, tmp_path / "again")
    save_mixq(model, layers, resolved, again, overwrite=True)
    assert torch.equal(logits(read_mixq(again).model), logits(model))


def test_a_failed_save_leaves_nothing(saved, tmp_path):
    _, model, resolved, layers, _ = saved

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_mixq(model, layers, resolved, tmp_path / "x", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def _copy(out: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in out.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("file", [WEIGHTS, "config.json", "plan.yaml"])
def test_damaged_files_are_named(saved, tmp_path, damage, file):
    folder = _copy(saved[-1], tmp_path / "copy")
    target = folder / file
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-1]))
    else:
        target.unlink()
    with pytest.raises(ExportError, match=file.replace(".", r"\.")):
        read_mixq(folder)


def test_bad_manifests_are_refused(saved, tmp_path):
    folder = _copy(saved[-1], tmp_path / "copy")
    good = json.loads((folder / MANIFEST).read_text())
    tensors = {k: {**v, "spec": "int8:g16"} if k.endswith("gate_proj.weight") else v
               for k, v in good["tensors"].items()}
    cases = {
        "not json": "{",
        "newer version": json.dumps({**good, "version": FORMAT_VERSION + 1}),
        "wrong parts": json.dumps({**good, "tensors": tensors}),
        "escaping file": json.dumps({**good, "files": {**good["files"], "../x": {"sha256": "", "bytes": 1}}}),
        "missing key": json.dumps({k: v for k, v in good.items() if k != "layers"}),
    }
    for why, text in cases.items():
        (folder / MANIFEST).write_text(text)
        with pytest.raises(ExportError, match=MANIFEST.replace(".", r"\.")):
            read_mixq(folder)
        with pytest.raises(ExportError):
            read_manifest(folder / MANIFEST)
    with pytest.raises(ExportError, match="no mixq_manifest"):
        read_mixq(tmp_path)
