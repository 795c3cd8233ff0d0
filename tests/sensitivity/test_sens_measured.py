"""Cached-block measured KL equals a brute-force whole-model measurement with the layer quantized."""

import pytest
import torch
import torch.nn.functional as F

from conftest import encoder_batches, lm_batches
from mixq.model.swap import layer_quantized
from mixq.model.tree import weight_matrix
from mixq.quant import QuantSpec, fake_quantize
from mixq.sensitivity.measured import OutputCache


def brute_kl(model, batches, name, Wq, inputs=None) -> float:
    """Mean per-token KL(p_ref || p_q) of full forwards, in fp64."""
    with torch.no_grad():
        refs = [F.log_softmax(model(**b).logits.double(), -1) for b in batches]
        with layer_quantized(model.get_submodule(name), Wq, inputs):
            outs = [F.log_softmax(model(**b).logits.double(), -1) for b in batches]
    kl = [(r.exp() * (r - o)).sum(-1) for r, o in zip(refs, outs)]
    return float(torch.cat([k.reshape(-1) for k in kl]).mean())


def brute_cos(model, batches, name, Wq) -> float:
    def emb(b):
        h = model(**b).last_hidden_state.double()
        m = b["attention_mask"].double()[..., None]
        return (h * m).sum(1) / m.sum(1)

    with torch.no_grad():
        refs = [emb(b) for b in batches]
        with layer_quantized(model.get_submodule(name), Wq):
            outs = [emb(b) for b in batches]
    cos = torch.cat([F.cosine_similarity(r, o, dim=-1) for r, o in zip(refs, outs)])
    return float((1 - cos).mean())


LM_CASES = [("model.layers.0.self_attn.q_proj", "int3:channel", None),
            ("model.layers.0.mlp.down_proj", "int4:g32", None),
            ("model.layers.1.self_attn.o_proj", "int2:channel", None),
            ("model.layers.1.mlp.gate_proj", "int4:channel", "int4:token"),
            ("lm_head", "int3:channel", None)]


def test_lm_cached_kl_equals_brute_force(llama) -> None:
    batches = lm_batches()
    cache = OutputCache(llama, batches, "lm")
    assert len(cache.hidden) == 2 and cache.block_of("model.layers.1.mlp.up_proj") == 1
    assert cache.block_of("lm_head") is None
    for name, wspec, ispec in LM_CASES:
        W = weight_matrix(llama.get_submodule(name))
        Wq = fake_quantize(W, wspec)
        inputs = QuantSpec.parse(ispec) if ispec else None
        got = cache.measure(name, Wq, inputs)
        want = brute_kl(llama, batches, name, Wq, inputs)
        assert want > 1e-5, name  # a real degradation, far above float noise
        assert got == pytest.approx(want, rel=2e-3), name
    assert cache.measure("model.layers.0.mlp.up_proj", None) == pytest.approx(0.0, abs=1e-7)


def test_lm_kl_respects_attention_mask(llama) -> None:
    batches = lm_batches(n=1)
    masked = [{**batches[0], "attention_mask": torch.tensor([[1] * 16, [1] * 10 + [0] * 6])}]
    name = "model.layers.1.mlp.down_proj"
    Wq = fake_quantize(weight_matrix(llama.get_submodule(name)), "int2:channel")
    got = OutputCache(llama, masked, "lm").measure(name, Wq)
    with torch.no_grad():
        ref = F.log_softmax(llama(**masked[0]).logits.double(), -1)
        with layer_quantized(llama.get_submodule(name), Wq):
            out = F.log_softmax(llama(**masked[0]).logits.double(), -1)
    kl = (ref.exp() * (ref - out)).sum(-1)  # [2, 16]
    want = float(kl[masked[0]["attention_mask"].bool()].mean())
    assert got == pytest.approx(want, rel=2e-3)


def test_encoder_cached_cosine_equals_brute_force(bert) -> None:
    batches = encoder_batches()
    cache = OutputCache(bert, batches, "encoder")
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense", "pooler.dense"):
        Wq = fake_quantize(weight_matrix(bert.get_submodule(name)), "int2:channel")
        got = cache.measure(name, Wq)
        want = brute_cos(bert, batches, name, Wq)
        if name == "pooler.dense":  # outside the blocks and not read by last_hidden_state
            assert got == pytest.approx(0.0, abs=1e-7) and want == pytest.approx(0.0, abs=1e-12)
        else:
            assert want > 1e-5
            assert got == pytest.approx(want, rel=2e-3), name
