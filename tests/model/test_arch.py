"""Architecture facts: every path resolves on tiny random models of each family; unknown families."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

from mixq.model.arch import ArchFacts, ArchitectureError, ScaleGroup, arch_facts, facts_table, known_families
from mixq.model.tree import blocks, get_module

DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=128)


def tiny_configs() -> dict[str, T.PretrainedConfig]:
    """One small config per family (some with GQA, some without)."""
    return {
        "llama": T.LlamaConfig(**DIMS, num_key_value_heads=2),
        "mistral": T.MistralConfig(**DIMS, num_key_value_heads=4),
        "qwen2": T.Qwen2Config(**DIMS, num_key_value_heads=2),
        "qwen3": T.Qwen3Config(**DIMS, num_key_value_heads=4, head_dim=16),
        "gemma": T.GemmaConfig(**DIMS, num_key_value_heads=1, head_dim=16),
        "gemma2": T.Gemma2Config(**DIMS, num_key_value_heads=4, head_dim=16),
        "gemma3_text": T.Gemma3TextConfig(**DIMS, num_key_value_heads=2, head_dim=16),
        "phi3": T.Phi3Config(**DIMS, num_key_value_heads=4, pad_token_id=0),
        "opt": T.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2,
                           vocab_size=128, word_embed_proj_dim=64, max_position_embeddings=64),
        "gpt2": T.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=64,
                             bos_token_id=0, eos_token_id=0),
        "bert": T.BertConfig(**DIMS, max_position_embeddings=64),
        "roberta": T.RobertaConfig(**DIMS, max_position_embeddings=64, pad_token_id=1),
    }


def tiny_model(family: str, head: bool = True, seed: int = 0, **overrides) -> nn.Module:
    cfg = tiny_configs()[family]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    if family in ("bert", "roberta"):
        model = T.AutoModelForMaskedLM.from_config(cfg) if head else T.AutoModel.from_config(cfg)
    else:
        model = T.AutoModelForCausalLM.from_config(cfg) if head else T.AutoModel.from_config(cfg)
    return model.eval()


def out_size(module: nn.Module) -> int:
    """Number of output channels of a norm, Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1]
    return module.weight.numel()


def in_size(module: nn.Module) -> int:
    return module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]


FAMILIES = sorted(tiny_configs())


def test_table_covers_families():
    assert set(FAMILIES) <= set(known_families())
    assert {"gemma3", "opt-post-ln"} <= set(facts_table())
    for key, facts in facts_table().items():
        assert facts.norm_kind in ("rms", "rms_plus_one", "layer"), key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", [True, False])
def test_facts_resolve(family, head):
    model = tiny_model(family, head=head)
    cfg = model.config
    facts = arch_facts(model)
    assert facts.family == family
    assert isinstance(get_module(model, facts.blocks), nn.ModuleList)
    assert isinstance(get_module(model, facts.embeddings), nn.Embedding)
    if facts.final_norm is not None:
        assert hasattr(get_module(model, facts.final_norm), "weight")
    if head:
        assert isinstance(get_module(model, facts.lm_head), nn.Linear)
    else:
        assert facts.lm_head is None
    bl = blocks(model, facts)
    assert len(bl) == 2 and bl[1][0] == facts.blocks + ".1"
    for _, block in bl:
        for name in facts.residual_readers + facts.residual_writers:
            assert get_module(block, name).weight.dim() == 2
        if facts.kv_projections is not None:
            for name in facts.kv_projections:
                get_module(block, name)
        get_module(block, facts.require("attention"))
        assert facts.require("scale_groups")
        for group in facts.scale_groups:
            prev = get_module(block, group.prev)
            d = out_size(prev)
            sizes = {in_size(get_module(block, lin)) for lin in group.linears}
            assert len(sizes) == 1, group
            if sizes != {d}:  # only v -> o under grouped-query attention: o.in = v.out * heads / kv_heads
                assert isinstance(prev, nn.Linear) and group.prev in facts.kv_projections
                n_kv = cfg.num_key_value_heads
                assert n_kv < cfg.num_attention_heads and sizes == {d * cfg.num_attention_heads // n_kv}
        # readers read the residual width, writers write it
        hidden = cfg.hidden_size
        assert all(in_size(get_module(block, n)) == hidden for n in facts.residual_readers)
        assert all(out_size(get_module(block, n)) == hidden for n in facts.residual_writers)


def test_opt_post_ln_has_no_norm_groups():
    model = tiny_model("opt", do_layer_norm_before=False)
    facts = arch_facts(model)
    assert facts.family == "opt" and facts.final_norm is None
    assert [g.prev for g in facts.scale_groups] == ["self_attn.v_proj", "fc1"]
    pre = arch_facts(tiny_model("opt"))
    assert pre.scale_groups[0] == ScaleGroup("self_attn_layer_norm",
                                             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(x)


class Plain(nn.Module):
    """No config: an embedding, a list of mixed heads and the big list of identical blocks."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.heads = nn.ModuleList([nn.Linear(16, 2), nn.Conv1d(16, 2, 1)])   # mixed classes
        self.small = nn.ModuleList([nn.Linear(16, 2)])                        # fewer parameters
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList([Block(16) for _ in range(3)])


def test_unknown_family_finds_blocks_and_require_raises():
    model = Plain()
    facts = arch_facts(model)
    assert facts.family == "Plain" and facts.blocks == "trunk.stack"
    assert [n for n, _ in blocks(model, facts)] == ["trunk.stack.0", "trunk.stack.1", "trunk.stack.2"]
    message = r"family 'Plain' has no fact 'scale_groups' \(needed by AWQ\); known families: .*llama"
    with pytest.raises(ArchitectureError, match=message):
        facts.require("scale_groups", needed_by="AWQ")
    for fact in ("norm_kind", "residual_readers", "kv_projections", "lm_head", "embeddings"):
        with pytest.raises(ArchitectureError, match=fact):
            facts.require(fact)
    with pytest.raises(ArchitectureError, match="no field 'nonsense'"):
        facts.require("nonsense")
    assert isinstance(ArchitectureError("x"), ValueError)


def test_unknown_model_type_uses_config_name():
    model = Plain()
    model.config = type("Cfg", (), {"model_type": "mystery"})()
    facts = arch_facts(model)
    assert facts.family == "mystery" and facts.blocks == "trunk.stack" and facts.scale_groups == ()
    with pytest.raises(ArchitectureError, match="family 'mystery' has no fact 'norm_kind'"):
        facts.require("norm_kind")


def test_no_blocks_at_all():
    facts = arch_facts(nn.Sequential(nn.Linear(2, 2)))
    assert facts.blocks == ""
    with pytest.raises(ArchitectureError, match="'blocks'"):
        blocks(nn.Sequential(), facts)


def test_facts_are_frozen():
    facts = arch_facts(tiny_model("llama"))
    with pytest.raises(Exception):
        facts.blocks = "x"  # type: ignore[misc]
    assert facts_table()["llama"].blocks == "layers"  # the table is rebuilt, never edited
    assert isinstance(facts, ArchFacts)
