"""Tiny random models and calibration batches for the sensitivity tests."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig


def make_llama() -> nn.Module:
    """A 2-block Llama (hidden 64, GQA 4/2 heads, vocab 128) with peaky outputs (larger init)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape) + 0.5)
    return model


def make_bert() -> nn.Module:
    torch.manual_seed(1)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                     vocab_size=100, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=0.2)
    return BertModel(cfg).eval()


def lm_batches(n: int = 2, b: int = 2, t: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (b, t), generator=g)} for _ in range(n)]


def encoder_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ([12, 7, 12], [5, 12, 9]):
        ids = torch.randint(1, 100, (3, 12), generator=g)
        mask = (torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return make_llama()


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return make_bert()
