"""compressed-tensors export of the 2-layer SmolLM2-135M cut, reloaded by transformers (CPU, fp32).

For each plan the cut is quantized by mixq (RTN, calibration 4 x 64 random ids for the input ranges),
written with ``save_compressed_tensors`` and loaded twice: by ``AutoModelForCausalLM.from_pretrained``
(transformers + compressed-tensors decompress the weights; fp8 inputs are fake-quantized by
compressed-tensors' own forward) and by mixq's ``read_compressed_tensors``. Both must give logits
*equal* to mixq's fake-quant model (tolerance 0): the decompressed weights are the same fp32 values
(integers or fp8 codes times the stored fp32 scale, one rounding each way), and compressed-tensors'
dynamic fp8 per-token input rule (``amax / 448``, divide, saturate, round to E4M3, multiply) is mixq's
operation for operation; the models then run the same modules in the same order. Measured: max |logit
difference| 0.0 for all three plans, both readers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixq.algorithms.runner import quantize_model
from mixq.export.compressed import read_compressed_tensors, save_compressed_tensors
from mixq.export.layers import quantized_layers
from mixq.model.plan_match import resolve
from mixq.plan import LayerSpec, Plan, Rule
from mixq.quant import QuantSpec

pytestmark = pytest.mark.real

Q = QuantSpec.parse
CALIB = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
TEST = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(1))

PLANS = {
    "int4_g64": Plan.uniform(LayerSpec(weights=Q("int4:g64"))),
    "fp8_w_fp8_token": Plan.uniform(LayerSpec(weights=Q("fp8_e4m3:channel"), inputs=Q("fp8_e4m3:token"))),
    "mixed": Plan((Rule("lm_head", LayerSpec.keep()),
                   Rule("model.layers.1.mlp.down_proj", LayerSpec.keep()),
                   Rule("*o_proj", LayerSpec(weights=Q("fp8_e4m3:channel"), inputs=Q("fp8_e4m3:token"))),
                   Rule("*self_attn*", LayerSpec(weights=Q("int8:channel"))),
                   Rule("*mlp*", LayerSpec(weights=Q("int4:g64"))))),
}


@pytest.fixture(scope="module")
def cut(smollm2_cut):
    model = copy.deepcopy(smollm2_cut)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=TEST).logits


@pytest.mark.parametrize("name", list(PLANS))
def test_transformers_reload_equals_fake_quant(cut, tmp_path, name):
    m = copy.deepcopy(cut)
    resolved = resolve(PLANS[name], m)
    report = quantize_model(m, resolved, CALIB, batch_size=4)
    layers = quantized_layers(m, resolved, report.scales)
    out = save_compressed_tensors(m, layers, resolved, tmp_path / name, source="smollm2")
    ref = logits(m)
    del m
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(logits(hf), ref), (logits(hf) - ref).abs().max().item()
    del hf
    back = read_compressed_tensors(out)
    assert torch.equal(logits(back.model), ref)
