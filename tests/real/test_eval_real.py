"""Evaluation on the real offline assets: the wiki corpus, SmolLM2 perplexity, MiniLM and EfficientNet-Lite0.

Measured before the assertions were set (torch CPU, fp32):
- wiki corpus: 10,033 extracts, 4,895,088 characters; SmolLM2 tokens N = 1,068,344 -> pool 961,510 and
  test 106,834 (int(N * 0.10)).
- SmolLM2 (full fp32 model) on eval_windows(test, n=2, length=128): ppl 18.78986 (nll 2.933317).
  On the full protocol (32 x 512) it is 14.159 (measured by a script, not here: too slow for a test).
- EfficientNet-Lite0 on the Grace Hopper photo (resize 256, center crop 224): top-5 ImageNet classes
  [400 academic gown, 667 mortarboard, 652 military uniform, 457 bow tie, 906 Windsor tie].
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from mixq.eval.corpus import calibration_windows, eval_windows, wiki_extracts, wiki_sentences, wiki_split
from mixq.eval.lm_metrics import embedding_agreement, encoder_batches, logit_agreement, perplexity
from mixq.eval.vision import sample_images, sample_photo, top1_agreement
from mixq.model.load import load_model, minilm_path, smollm2_path
from mixq.model.vision import load_efficientnet_lite0

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def splits() -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)
    return wiki_split(tokenizer)  # cached token stream after the first run (~7-20 s uncached)


def test_wiki_corpus_and_split_sizes(splits):
    extracts = wiki_extracts()
    assert len(extracts) == 10_033 and extracts[0].startswith("20th-century classical music is")
    pool, test = splits
    assert (len(pool), len(test)) == (961_510, 106_834)
    assert len(test) == int((len(pool) + len(test)) * 0.10)
    assert eval_windows(test).shape == (32, 512) and calibration_windows(pool).shape == (64, 512)
    assert wiki_sentences(5, seed=0) == wiki_sentences(5, seed=0) != wiki_sentences(5, seed=1)


def test_smollm2_perplexity_on_two_short_windows(splits):
    model = load_model("smollm2")
    windows = eval_windows(splits[1], n=2, length=128)
    got = perplexity(model, windows)
    assert got.tokens == 2 * 127
    assert got.ppl == pytest.approx(18.78986, rel=0.02)
    same = logit_agreement(model, model, windows[:1, :32])
    assert same.top1 == 1.0 and abs(same.kl) < 1e-6


def test_minilm_embedding_agreement_with_itself():
    model = load_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    batches = encoder_batches(tokenizer, wiki_sentences(16, seed=0), batch_size=8)
    got = embedding_agreement(model, model, batches)
    assert got.n == 16 and got.cosine == pytest.approx(1.0, abs=1e-6) and got.rel_mse < 1e-10


def test_efficientnet_lite0_agrees_with_itself_and_sees_grace_hopper():
    model = load_efficientnet_lite0()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    got = top1_agreement(model, model, sample_images(8, seed=0), batch_size=8)
    assert got.n == 8 and got.top1 == 1.0 and abs(got.kl) < 1e-6
    with torch.inference_mode():
        top5 = model(sample_photo("grace_hopper.jpg")).topk(5).indices[0].tolist()
    assert top5[0] in {400, 652, 457, 667}  # academic gown, military uniform, bow tie, mortarboard
    assert len(set(top5) & {400, 457, 652, 667, 834, 906}) >= 3  # (+ suit, Windsor tie)
