"""PTQ on real models: the 2-layer cut of SmolLM2-135M and MiniLM, at one CPU thread.

Calibration: 8 x 128 random token ids (seed 0, ids < 49152); test: 2 x 128 other random ids (seed 1).
KL is ``KL(p_fp32 || p_quantized)`` per token over the 256 test positions.

Measured before setting the bounds (fp32, CPU, torch 1 thread):
- int4:g64 GPTQ loss / RTN loss per layer: 0.01 (o_proj of layer 0) to 0.36 (gate/up); KL GPTQ 0.034,
  RTN 0.053; AWQ (grid 10, clip search) 0.021; W8A8 int8:channel + int8:token: SmoothQuant (alpha 0.5)
  0.0017, plain RTN 0.0030;
- keep-all plan: logits bit-identical; offline Hadamard rotation (seed 0) with a keep-all plan: max
  |logit difference| 6.5e-05 for max |logit| 78 (bound 2e-3, as in test_rotate_real.py);
- MiniLM int8:channel RTN: mean embedding cosine 0.99958 on 32 wiki sentences (int4:channel: 0.913).
Total about 35 s of CPU time, most of it loading SmolLM2, AWQ's searches and the fp64 rotation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mixq.algorithms.runner import quantize_model
from mixq.model.load import load_model
from mixq.plan import LayerSpec, Options, Plan
from mixq.quant import QuantSpec

pytestmark = pytest.mark.real

Q = QuantSpec.parse
CALIB = torch.randint(0, 49152, (8, 128), generator=torch.Generator().manual_seed(0))
TEST = torch.randint(0, 49152, (2, 128), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def cut(smollm2_cut):
    model = copy.deepcopy(smollm2_cut)
    with torch.no_grad():
        ref = model(input_ids=TEST).logits
    return model, ref


def quantized(cut, plan: Plan | LayerSpec, calib: torch.Tensor | None = CALIB, **kw):
    base, _ = cut
    m = copy.deepcopy(base)
    plan = Plan.uniform(plan) if isinstance(plan, LayerSpec) else plan
    report = quantize_model(m, plan, calib, batch_size=4, **kw)
    with torch.no_grad():
        out = m(input_ids=TEST).logits
    return out, report


def kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    logp, logq = ref.log_softmax(-1), out.log_softmax(-1)
    return F.kl_div(logq, logp, log_target=True, reduction="sum").item() / (ref.shape[0] * ref.shape[1])


@pytest.fixture(scope="module")
def rtn_kl(cut):
    out, _ = quantized(cut, LayerSpec(weights=Q("int4:g64")), calib=None)
    return kl(cut[1], out)


def test_gptq_beats_rtn(cut, rtn_kl):
    out, report = quantized(cut, LayerSpec(weights=Q("int4:g64"), algorithm="gptq"))
    assert len(report.layers) == 14
    for r in report.layers:
        assert r.loss <= r.rtn_loss, r
    assert sum(r.loss < 0.5 * r.rtn_loss for r in report.layers) >= 12
    gptq_kl = kl(cut[1], out)
    assert 0 < gptq_kl < rtn_kl, (gptq_kl, rtn_kl)
    assert 0.01 < rtn_kl < 0.2  # int4 does change a real model, by a bounded amount
    assert report.bits["quantized_bits_per_weight"] == pytest.approx(4.5)


def test_awq_beats_rtn(cut, rtn_kl):
    spec = LayerSpec(weights=Q("int4:g64"), algorithm="awq", options=Options(awq_grid=10))
    out, report = quantized(cut, spec)
    assert any("awq alpha" in n for n in report.layers[0].notes)
    assert kl(cut[1], out) < rtn_kl


def test_smoothquant_beats_plain_w8a8(cut):
    w8a8 = dict(weights=Q("int8:channel"), inputs=Q("int8:token"))
    plain, _ = quantized(cut, LayerSpec(**w8a8))
    smooth, _ = quantized(cut, LayerSpec(**w8a8, options=Options(smooth_alpha=0.5)))
    assert kl(cut[1], smooth) < kl(cut[1], plain) < 0.02


def test_keep_all_is_exact(cut):
    out, report = quantized(cut, Plan(()))
    assert torch.equal(out, cut[1]) and kl(cut[1], out) == 0.0
    assert report.layers == []


def test_offline_rotation_keeps_logits(cut):
    out, report = quantized(cut, Plan(()), calib=None, rotate="hadamard", rotate_seed=0)
    assert report.rotation["hidden"] == 576 and report.rotation["untied"]
    ref = cut[1]
    assert ref.abs().max() > 5
    assert (out - ref).abs().max().item() < 2e-3
    assert abs(kl(ref, out)) < 1e-6


def test_minilm_int8_embeddings_agree():
    from mixq.eval.corpus import wiki_sentences
    from mixq.eval.lm_metrics import embedding_agreement, encoder_batches
    from mixq.pipeline import load_tokenizer

    ref = load_model("minilm")
    batches = encoder_batches(load_tokenizer("minilm"), wiki_sentences(32, seed=0))
    model = copy.deepcopy(ref)
    report = quantize_model(model, Plan.uniform(LayerSpec(weights=Q("int8:channel"))), None)
    assert len(report.layers) >= 36  # 6 layers x (q, k, v, o, up, down) + pooler
    agreement = embedding_agreement(model, ref, batches)
    assert agreement.n == 32
    assert 0.99 < agreement.cosine < 1.0 and agreement.rel_mse > 0
