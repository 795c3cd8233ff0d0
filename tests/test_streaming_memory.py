"""A streamed run stays under its memory budget, measured by the quantizing process itself.

A synthetic random Llama of ~190 MiB of fp32 weights (28 blocks of ~7 MiB) is quantized in a
subprocess with ``max_memory`` = 100 MiB, about half the model: GPTQ on each block's ``o_proj``
(calibration inputs, Hessians and the next block's inputs all flow), RTN elsewhere. The subprocess
reports its peak resident size (``VmHWM``) minus its resident size after imports and one warm-up
quantization of a small matrix (numba compiles its kernels on first use: a fixed cost, independent
of the model). The peak is reset through ``/proc/self/clear_refs`` after the warm-up where the
kernel allows it; otherwise the figure also counts the warm-up (an upper bound).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

BUDGET_MIB = 100

CHILD = r"""
import json, sys
from pathlib import Path

from mixq.run_info import process_memory as status

import torch
torch.set_num_threads(1)
from transformers import LlamaForCausalLM  # the model class's import is part of the baseline
from mixq.algorithms.gptq import gptq
from mixq.algorithms.rtn import rtn
from mixq.plan import LayerSpec, Plan
from mixq.plan.plan import Rule
from mixq.quant import QuantSpec
from mixq.streaming import quantize_streamed

root, budget = Path(sys.argv[1]), int(sys.argv[2])
spec = QuantSpec.parse("int4:g64")
W, X = torch.randn(384, 384), torch.randn(512, 384)
rtn(W, spec, None), gptq(W, X.T @ X, spec)  # warm-up: numba kernels compile on first use
del W, X
plan = Plan((Rule("lm_head", LayerSpec.keep()),
             Rule("*.self_attn.o_proj", LayerSpec(weights=spec, algorithm="gptq")),
             Rule("*", LayerSpec(weights=spec))))
base = status("VmRSS:")
try:
    Path("/proc/self/clear_refs").write_text("5")
except OSError:
    pass
quantize_streamed(str(root / "src"), plan, out=root / "out", max_memory=budget, calib=str(root / "tokens.pt"),
                  samples=4, length=64, batch_size=4)
meta = json.loads((root / "out" / "mixq.json").read_text())
print(json.dumps({"peak": status("VmHWM:") - base, "estimate": meta["streamed"]["estimated_bytes"]}))
"""


def write_model(folder) -> int:
    """A random Llama (hidden 384, MLP 1024, 28 blocks, vocab 1024, tied) written tensor by tensor
    from its meta skeleton's shapes; returns its fp32 size in bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from mixq.model.lazy import meta_skeleton, state_names

    cfg = LlamaConfig(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=6,
                      num_hidden_layers=28, vocab_size=1024, tie_word_embeddings=True,
                      architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(folder)
    skeleton = meta_skeleton(folder)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name in state_names(skeleton):
        shape = skeleton.get_parameter(name).shape
        tensors[name] = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.05
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * 4 for t in tensors.values())


def test_streamed_peak_rss_stays_under_a_budget_below_the_model_size(tmp_path):
    (tmp_path / "src").mkdir()
    size = write_model(tmp_path / "src")
    tokens = torch.randint(0, 1024, (4000,), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    budget = BUDGET_MIB * 2**20
    assert size > 1.8 * budget  # the weights alone do not fit the budget
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(budget)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["estimate"] <= budget
    assert result["peak"] < budget, f"peak {result['peak'] / 2**20:.0f} MiB over the {BUDGET_MIB} MiB budget"
    # the up-front estimate is of the right size (allocator slack made single runs 20 % over it)
    assert result["peak"] <= 1.5 * result["estimate"]
