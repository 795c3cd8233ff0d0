"""Folding a positive scale across each family's scale groups leaves the model's logits unchanged."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

from mixq.model.arch import ArchitectureError, arch_facts
from mixq.model.fold import scale_input_channels, scale_output_channels
from mixq.model.tree import blocks, get_module

DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=128)


def tiny_model(family: str, **overrides) -> nn.Module:
    """A tiny random model with randomized norm weights and biases (every 1-D parameter perturbed)."""
    cfg = {
        "llama": lambda: T.LlamaConfig(**DIMS, num_key_value_heads=2),
        "mistral": lambda: T.MistralConfig(**DIMS, num_key_value_heads=4),
        "qwen2": lambda: T.Qwen2Config(**DIMS, num_key_value_heads=2),
        "qwen3": lambda: T.Qwen3Config(**DIMS, num_key_value_heads=4, head_dim=16),
        "gemma": lambda: T.GemmaConfig(**DIMS, num_key_value_heads=4, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**DIMS, num_key_value_heads=2, head_dim=16),
        "gemma3_text": lambda: T.Gemma3TextConfig(**DIMS, num_key_value_heads=4, head_dim=16),
        "phi3": lambda: T.Phi3Config(**DIMS, num_key_value_heads=4, pad_token_id=0),
        "opt": lambda: T.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2,
                                   vocab_size=128, word_embed_proj_dim=64, max_position_embeddings=64),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=64,
                                     bos_token_id=0, eos_token_id=0),
        "bert": lambda: T.BertConfig(**DIMS, max_position_embeddings=64),
    }[family]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = (T.AutoModelForMaskedLM if family == "bert" else T.AutoModelForCausalLM).from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def out_size(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[1]
    return module.weight.numel()


def in_size(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def fold_all(model: nn.Module, seed: int = 1, linears: bool = True, norm_kind: str | None = None) -> int:
    """Fold a random positive scale into every group whose sizes agree; returns the number folded."""
    facts = arch_facts(model)
    gen = torch.Generator().manual_seed(seed)
    folded = 0
    for _, block in blocks(model, facts):
        for group in facts.require("scale_groups"):
            prev = get_module(block, group.prev)
            mods = [get_module(block, n) for n in group.linears]
            d = out_size(prev)
            if any(in_size(m) != d for m in mods):  # v -> o under GQA: the runner skips it
                continue
            s = torch.exp(0.7 * torch.randn(d, generator=gen))  # [d] > 0
            scale_output_channels(prev, s, norm_kind or facts.norm_kind)
            if linears:
                for m in mods:
                    scale_input_channels(m, s)
            folded += 1
    return folded


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt2",
            "bert"]


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_preserves_logits(family):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    n = fold_all(model)
    facts = arch_facts(model)
    gqa = getattr(model.config, "num_key_value_heads", 4) < getattr(model.config, "num_attention_heads", 4)
    assert n == 2 * (len(facts.scale_groups) - (1 if gqa else 0))
    changed = [k for k, p in model.named_parameters() if not torch.equal(p, before[k])]
    assert len(changed) >= 2 * n
    out = logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("family", ["llama", "gemma", "opt"])
def test_half_a_fold_changes_logits(family):
    """Sanity check of the oracle: scaling only the producers (or with the wrong norm kind) is visible."""
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model = tiny_model(family)
    ref = logits(model, ids)
    fold_all(model, linears=False)
    assert (logits(model, ids) - ref).abs().max() > 1e-2 * ref.abs().max()
    if family == "gemma":
        model = tiny_model(family)
        fold_all(model, norm_kind="rms")  # Gemma norms compute x * (1 + w): "rms" is wrong for them
        assert (logits(model, ids) - ref).abs().max() > 1e-2 * ref.abs().max()


def test_opt_post_ln_groups_are_valid():
    model = tiny_model("opt", do_layer_norm_before=False)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    assert fold_all(model) == 4
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_fold_linear_and_conv1d_directly():
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    s = torch.rand(4) + 0.5
    for first, second in [(nn.Linear(6, 4), nn.Linear(4, 3)), (Conv1D(4, 6), Conv1D(3, 4))]:
        y, ref = first(x), second(first(x))  # [5, 4], [5, 3]
        scale_output_channels(first, s, "layer")  # norm_kind is ignored for a Linear / Conv1D
        torch.testing.assert_close(first(x) * s, y, rtol=1e-5, atol=1e-5)
        scale_input_channels(second, s)
        torch.testing.assert_close(second(first(x)), ref, rtol=1e-5, atol=1e-5)
    conv = nn.Conv2d(4, 2, 3)
    img = torch.randn(1, 4, 5, 5)
    ref = conv(img)
    scale_input_channels(conv, s)
    torch.testing.assert_close(conv(img / s[None, :, None, None]), ref, rtol=1e-5, atol=1e-5)


def test_fold_keeps_dtype_and_checks_inputs():
    lin = nn.Linear(4, 3).to(torch.bfloat16)
    scale_input_channels(lin, torch.full((4,), 2.0))
    assert lin.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"must have shape \[4\], found \[3\]"):
        scale_input_channels(lin, torch.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        scale_output_channels(nn.LayerNorm(4), torch.tensor([1.0, -1.0, 1.0, 1.0]), "layer")
    with pytest.raises(ArchitectureError, match="norm_kind must be one of"):
        scale_output_channels(nn.LayerNorm(4), torch.ones(4), "batch")
    with pytest.raises(ArchitectureError, match="no weight"):
        scale_output_channels(nn.LayerNorm(4, elementwise_affine=False), torch.ones(4), "layer")
    with pytest.raises(ArchitectureError, match="cannot scale input channels"):
        scale_input_channels(nn.Conv2d(4, 4, 3, groups=2), torch.ones(2))


@pytest.mark.real
def test_fold_on_smollm2_cut():
    from mixq.model.load import load_model

    model = load_model("smollm2")
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    facts = arch_facts(model)
    assert (facts.family, facts.blocks, facts.norm_kind) == ("llama", "model.layers", "rms")
    assert facts.lm_head == "lm_head"
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    assert fold_all(model) == 2 * 3  # SmolLM2-135M: 9 heads, 3 kv heads -> v -> o skipped
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.real
def test_minilm_facts():
    from mixq.model.load import load_model

    model = load_model("minilm")
    facts = arch_facts(model)
    assert facts.family == "bert" and len(blocks(model, facts)) == model.config.num_hidden_layers
    for _, block in blocks(model, facts):
        for name in facts.residual_readers + facts.residual_writers:
            assert isinstance(get_module(block, name), nn.Linear)
