"""Perplexity, logit agreement and embedding agreement against obvious loops on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

from mixq.eval.lm_metrics import (MetricInputError, embedding_agreement, encoder_batches, logit_agreement,
                                  perplexity)


def tiny_llama(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_bert(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                     vocab_size=100, max_position_embeddings=64)
    return AutoModel.from_config(cfg).eval()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))


def test_perplexity_matches_cross_entropy_loop(windows):
    model = tiny_llama(0)
    seen = []
    got = perplexity(model, windows, progress=lambda done, total: seen.append((done, total)))
    losses = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1], w[1:], reduction="none"))
    nll = torch.cat(losses).double().mean().item()
    assert got.tokens == 3 * 16
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert got.ppl > 64  # a random model is close to uniform over 128 tokens
    assert seen == [(1, 3), (2, 3), (3, 3)] and got.seconds > 0


def test_logit_agreement_with_itself_is_perfect(windows):
    model = tiny_llama(0)
    got = logit_agreement(model, model, windows)
    assert got.tokens == 48 and got.top1 == 1.0 and abs(got.kl) < 1e-6


def test_logit_agreement_matches_kl_loop(windows):
    model, reference = tiny_llama(1), tiny_llama(2)
    got = logit_agreement(model, reference, windows)
    kls, agree = [], []
    with torch.no_grad():
        for w in windows:
            logq = model(w[None]).logits[0, :-1].log_softmax(-1)
            logp = reference(w[None]).logits[0, :-1].log_softmax(-1)
            kls.append(F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1))
            agree.append(logq.argmax(-1) == logp.argmax(-1))
    assert got.kl == pytest.approx(torch.cat(kls).double().mean().item(), rel=1e-4)
    assert got.kl > 0
    assert got.top1 == pytest.approx(torch.cat(agree).double().mean().item())


def test_windows_must_be_integer_2d():
    with pytest.raises(MetricInputError, match="integer token windows"):
        perplexity(tiny_llama(0), torch.zeros(2, 8))
    with pytest.raises(MetricInputError, match="L >= 2"):
        perplexity(tiny_llama(0), torch.zeros(2, 1, dtype=torch.long))


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (4, 12), generator=gen)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[3, 3:] = 0
    ids = ids * mask
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]},
            {"input_ids": ids[2:], "attention_mask": mask[2:]}]


def test_embedding_agreement_with_itself_is_one():
    model = tiny_bert(0)
    got = embedding_agreement(model, model, _batches())
    assert got.n == 4 and got.cosine == pytest.approx(1.0, abs=1e-6) and got.rel_mse < 1e-12


def test_embedding_agreement_matches_mean_pool_oracle():
    model, reference = tiny_bert(1), tiny_bert(2)
    batches = _batches()
    got = embedding_agreement(model, reference, batches)
    cos, err, ref = [], 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            for i in range(len(b["input_ids"])):
                keep = int(b["attention_mask"][i].sum())  # each text alone, without its padding
                x = {"input_ids": b["input_ids"][i:i + 1, :keep],
                     "attention_mask": b["attention_mask"][i:i + 1, :keep]}
                e = model(**x).last_hidden_state[0].mean(0).double()
                r = reference(**x).last_hidden_state[0].mean(0).double()
                cos.append(F.cosine_similarity(e, r, dim=0).item())
                err += (e - r).pow(2).sum().item()
                ref += r.pow(2).sum().item()
    assert got.cosine == pytest.approx(sum(cos) / len(cos), abs=1e-5)
    assert got.rel_mse == pytest.approx(err / ref, rel=1e-4)
    assert got.cosine < 0.999


def test_encoder_batches_splits_texts():
    calls = []

    def fake_tokenizer(texts, padding, truncation, max_length, return_tensors):
        calls.append((list(texts), max_length))
        n = len(texts)
        ones = torch.ones(n, 3, dtype=torch.long)
        return {"input_ids": ones, "attention_mask": ones}

    texts = [f"text {i}" for i in range(5)]
    out = encoder_batches(fake_tokenizer, texts, batch_size=2, max_length=7)
    assert [len(b["input_ids"]) for b in out] == [2, 2, 1]
    assert [c[0] for c in calls] == [texts[0:2], texts[2:4], texts[4:]] and calls[0][1] == 7
