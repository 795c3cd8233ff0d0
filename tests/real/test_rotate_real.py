"""Offline Hadamard rotation of a real model: the 2-layer cut of SmolLM2-135M (hidden 576 = 36 * 16).

Measured before setting the bound (fp32, CPU, 64 random tokens, seed 0): max |logit| 79.2, max
|logit difference| after rotate(kind="hadamard", seed=0) 6.1e-05 (mean 4.5e-06); the bound 2e-3
leaves a 30x margin while a wrong rotation changes the logits by O(1). The fp64 rotation of the
49152 x 576 embedding and (untied) head dominates the run time.
"""

from __future__ import annotations

import pytest
import torch

from mixq.model import load_model
from mixq.model.rotate import rotate

pytestmark = pytest.mark.real


def test_smollm2_cut_rotation_keeps_logits():
    model = load_model("smollm2")
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    report = rotate(model, kind="hadamard", seed=0)
    with torch.no_grad():
        after = model(ids).logits
    assert report.hidden == 576 and report.untied and report.norms_fused == 5
    assert not torch.all(norm_before == 1.0)  # the fused gains were non-trivial
    diff = (before - after).abs().max().item()
    assert before.abs().max().item() > 5.0
    assert diff < 2e-3, diff
