"""Offline residual rotation: fusing norms and rotating leave tiny random RMSNorm models' logits unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModel, AutoModelForCausalLM, BertConfig, GemmaConfig, GPT2Config, LlamaConfig,
                          MistralConfig, OPTConfig, Qwen2Config)

from mixq.algorithms.hadamard import HadamardError
from mixq.model.arch import ArchitectureError, arch_facts
from mixq.model.rotate import RotationReport, fuse_norms, rotate, rotate_model
from mixq.model.tree import get_module

SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=128)
CONFIGS = {
    "llama": lambda tie: LlamaConfig(**SIZES, tie_word_embeddings=tie),
    "llama_bias": lambda tie: LlamaConfig(**SIZES, tie_word_embeddings=tie, attention_bias=True,
                                          mlp_bias=True),
    "mistral": lambda tie: MistralConfig(**SIZES, tie_word_embeddings=tie),
    "qwen2": lambda tie: Qwen2Config(**SIZES, tie_word_embeddings=tie),
    "gemma": lambda tie: GemmaConfig(**SIZES, head_dim=16, tie_word_embeddings=tie),
}


def tiny_model(name: str, tie: bool) -> torch.nn.Module:
    """Seeded tiny model with non-trivial norms and biases and O(1) logits."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](tie)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:  # gain around 1 (Gemma stores gain - 1)
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + (-0.5 if name == "gemma" else 0.5))
            elif pname.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() == 2:  # larger weights than the default 0.02 init, so the blocks matter
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = a.abs().max().item()
    assert scale > 0.5
    assert (a - b).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fuse_norms_keeps_logits(name, tie):
    model = tiny_model(name, tie)
    facts = arch_facts(model)
    before = logits(model, IDS)
    fuse_norms(model, facts)
    assert_close(before, logits(model, IDS))
    identity = 0.0 if name == "gemma" else 1.0
    for pname, p in model.named_parameters():
        if "norm" in pname:
            assert torch.all(p == identity), pname
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings


@pytest.mark.parametrize("kind,seed", [("hadamard", None), ("hadamard", 3), ("random", 5)])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_rotate_keeps_logits(name, tie, kind, seed):
    model = tiny_model(name, tie)
    emb_before = model.model.embed_tokens.weight.detach().clone()
    before = logits(model, IDS)
    report = rotate(model, kind=kind, seed=seed)
    assert report == RotationReport(hidden=64, kind=kind, seed=seed, untied=tie, norms_fused=2 * 2 + 1)
    assert_close(before, logits(model, IDS))
    # the weights really moved: embeddings are rotated, not left alone
    emb = model.model.embed_tokens.weight.detach()
    assert (emb - emb_before).abs().max() > 0.1
    assert torch.allclose(emb.norm(dim=1), emb_before.norm(dim=1), rtol=1e-5)


def test_rotate_without_fusing_changes_logits_and_is_refused():
    # The oracle that the tests above can fail: rotating with the norm gains left in place breaks the model.
    model = tiny_model("llama", tie=False)
    facts = arch_facts(model)
    G = torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Q = torch.linalg.qr(G)[0]
    with pytest.raises(ValueError, match="call fuse_norms first"):
        rotate_model(model, Q, facts)
    before = logits(model, IDS)
    fuse_norms(model, facts)
    rotate_model(model, Q, facts)
    assert_close(before, logits(model, IDS))
    with pytest.raises(ValueError, match=r"\[64, 64\].*\[32, 32\]"):
        rotate_model(model, Q[:32, :32], facts)


def test_rotate_unfused_weights_would_differ():
    model = tiny_model("qwen2", tie=False)
    before = logits(model, IDS)
    with torch.no_grad():  # rotate only the embeddings: the output must change (the check is sensitive)
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ torch.linalg.qr(
            torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0])
    assert (before - logits(model, IDS)).abs().max() > 0.1


@pytest.mark.parametrize("cfg,auto", [
    (OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
               word_embed_proj_dim=32), AutoModelForCausalLM),
    (GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=128), AutoModelForCausalLM),
    (BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=128), AutoModel),
])
def test_layernorm_families_refused(cfg, auto):
    torch.manual_seed(0)
    model = auto.from_config(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArchitectureError, match=rf"needs RMSNorm; family '{cfg.model_type}' uses LayerNorm"):
        rotate(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_unknown_family_names_missing_fact():
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)]))
    with pytest.raises(ArchitectureError, match="'norm_kind'"):
        rotate(model)


def test_unsupported_hidden_size_leaves_model_untouched():
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SIZES, "hidden_size": 52, "num_attention_heads": 2})
    model = AutoModelForCausalLM.from_config(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model, IDS)
    with pytest.raises(HadamardError, match="n=52"):
        rotate(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    report = rotate(model, kind="random")
    assert report.hidden == 52 and report.seed == 0
    assert torch.allclose(before, logits(model, IDS), atol=1e-4 * before.abs().max().item())


def test_rotated_model_has_independent_head_parameter():
    model = tiny_model("gemma", tie=True)
    facts = arch_facts(model)
    rotate(model)
    head, emb = get_module(model, facts.lm_head).weight, get_module(model, facts.embeddings).weight
    assert head.data_ptr() != emb.data_ptr()
    assert {n for n, _ in model.named_parameters()} >= {"lm_head.weight", "model.embed_tokens.weight"}


def test_sandwich_norms_refused():
    # Gemma 2 normalizes each sublayer's output before the residual add: that gain cannot be folded.
    from transformers import Gemma2Config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma2Config(**SIZES, head_dim=16))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArchitectureError, match="post_attention_layernorm.*sublayer output"):
        rotate(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
