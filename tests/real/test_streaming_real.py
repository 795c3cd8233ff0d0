"""Streamed GPTQ of the 2-layer SmolLM2 cut equals the in-memory run, bit for bit.

The cut (fp32, tied embeddings, 2 blocks) is saved as a Hugging Face folder; both paths quantize it
with int4:g64 GPTQ (LM head kept) on 8 x 128 calibration windows drawn from a file of random token
ids (seed 0), batch 4; the streamed run under a 1 GiB budget (its estimate: ~400 MiB, mostly GPTQ's
fp64 Hessian inverse of the 1536-wide down projections and the 49152 x 576 embedding; the cut's fp32
weights are 135 MiB, so a budget below them cannot hold one block's GPTQ). About 15 s at one thread.
"""

from __future__ import annotations

import pytest
import torch

from mixq.model.lazy import LazyCheckpoint
from mixq.model.run_folder import load_quantized
from mixq.pipeline import quantize
from mixq.plan import LayerSpec, Plan
from mixq.quant import QuantSpec
from mixq.streaming import quantize_streamed

pytestmark = pytest.mark.real


def test_streamed_gptq_equals_in_memory_on_smollm2_cut(smollm2_cut, tmp_path):
    src = tmp_path / "cut"
    smollm2_cut.save_pretrained(src)
    tokens = torch.randint(0, 49152, (4096,), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tok.pt")
    plan = Plan.uniform(LayerSpec(weights=QuantSpec.parse("int4:g64"), algorithm="gptq"))
    kw = {"calib": str(tmp_path / "tok.pt"), "samples": 8, "length": 128, "batch_size": 4}
    a = quantize(str(src), plan, out=tmp_path / "mem", **kw)
    b = quantize_streamed(str(src), plan, out=tmp_path / "str", max_memory=2**30, **kw)
    ca, cb = LazyCheckpoint(a.out), LazyCheckpoint(b.out)
    assert sorted(ca.names()) == sorted(cb.names())
    ta, tb = ca.read(ca.names(), dtype=None), cb.read(cb.names(), dtype=None)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [(r.name, r.loss) for r in a.report.layers] == [(r.name, r.loss) for r in b.report.layers]
    from safetensors.torch import load_file

    sa, sb = load_file(a.out / "scales.safetensors"), load_file(b.out / "scales.safetensors")
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_quantized(a.out)[0](x).logits, load_quantized(b.out)[0](x).logits)
