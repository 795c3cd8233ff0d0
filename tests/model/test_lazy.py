"""Lazy safetensors reading and the meta-device skeleton (mixq.model.lazy) on a tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch

from mixq.model.capture import StopForward, capture_block_inputs
from mixq.model.lazy import (LazyCheckpoint, fill, meta_skeleton, release, state_names, tensor_of,
                             tied_aliases)
from mixq.model.load import ModelLoadError, load_model
from mixq.model.qmodules import wrap


@pytest.fixture(scope="module")
def src(tmp_path_factory, make_llama_folder):
    return make_llama_folder(tmp_path_factory.mktemp("lazy")) / "src"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, src):
    """The same model saved as bf16 in several shards with an index."""
    model = load_model(src).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("sharded") / "src"
    model.save_pretrained(out, max_shard_size="40KB")
    return out


def test_headers_only_then_reads_what_is_asked(src):
    ck = LazyCheckpoint(src)
    ref = load_model(src)
    assert set(ck.names()) == set(state_names(ref))
    assert ck.nbytes() == sum(p.numel() * 4 for p in ref.parameters())
    got = ck.read(["model.layers.1.mlp.down_proj.weight"])
    assert list(got) == ["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], ref.model.layers[1].mlp.down_proj.weight)


def test_sharded_bf16_checkpoint_reads_as_fp32(sharded):
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len({i.file for i in LazyCheckpoint(sharded).tensors.values()}) > 1
    ck = LazyCheckpoint(sharded)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert ck.tensors[name].dtype == "BF16"
    t = ck.read([name])[name]
    assert t.dtype == torch.float32
    assert torch.equal(t, load_model(sharded).model.layers[0].self_attn.q_proj.weight)
    assert ck.read([name], dtype=None)[name].dtype == torch.bfloat16


def test_missing_tensor_and_folder_are_clear_errors(src, tmp_path):
    with pytest.raises(ModelLoadError, match="expected tensors .*nope"):
        LazyCheckpoint(src).read(["nope"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        LazyCheckpoint(tmp_path)


def test_skeleton_is_meta_with_real_rotary_buffers_and_tied_head(src):
    ref = load_model(src)
    m = meta_skeleton(src)
    assert all(p.is_meta for p in m.parameters())
    assert torch.equal(m.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert tied_aliases(m) == {"model.embed_tokens.weight": ["lm_head.weight"]}
    assert "lm_head.weight" not in state_names(m)


def test_fill_one_block_reproduces_the_next_blocks_inputs(src):
    """Outside tensors + block 0 filled: block 1 receives exactly what the loaded model gives it."""
    ref = load_model(src)
    m = meta_skeleton(src)
    ck = LazyCheckpoint(src)
    names = list(m.state_dict(keep_vars=True))
    outside = [n for n in names if not n.startswith("model.layers.") and n != "lm_head.weight"]
    fill(m, ck.read(outside), tied_aliases(m))
    assert m.lm_head.weight is m.model.embed_tokens.weight
    block0 = [n for n in names if n.startswith("model.layers.0.")]
    fill(m, ck.read(block0))
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))

    def inputs_of_block1(model):
        with capture_block_inputs(model.model.layers[1]) as calls, torch.no_grad():
            try:
                model(input_ids=x, use_cache=False)
            except StopForward:
                pass
        return calls[0][0][0]

    assert torch.equal(inputs_of_block1(m), inputs_of_block1(ref))
    release(m, block0)
    assert all(p.is_meta for p in m.model.layers[0].parameters())


def test_names_look_through_quant_wrappers(src):
    m = meta_skeleton(src)
    wrap(m, "model.layers.0.mlp.up_proj")
    name = "model.layers.0.mlp.up_proj.weight"
    fill(m, LazyCheckpoint(src).read([name]))
    assert not tensor_of(m, name).is_meta
    assert tensor_of(m, name) is m.model.layers[0].mlp.up_proj.inner.weight
    with pytest.raises(ModelLoadError, match="shape"):
        fill(m, {name: torch.zeros(3, 3)})
