"""``mixq export`` then ``mixq generate`` on a 2-layer cut of SmolLM2 with its real tokenizer.

The cut is quantized to int4:g64 (RTN) and saved as a run folder; the command exports it to
compressed-tensors and mixq format. Packed weight-only layers decode bit-identical weights, so the
greedy text of the packed model must equal that of the fake-quant model (``--fake``).
"""

from __future__ import annotations

import copy

import contextlib
import io
import json

import pytest

from mixq.algorithms.runner import quantize_model
from mixq.cli import main
from mixq.model.plan_match import resolve
from mixq.model.run_folder import save_quantized
from mixq.pipeline import load_tokenizer
from mixq.plan import LayerSpec, Plan
from mixq.quant import QuantSpec

pytestmark = pytest.mark.real
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, smollm2_cut):
    model = copy.deepcopy(smollm2_cut)
    resolved = resolve(Plan.uniform(LayerSpec(weights=QuantSpec.parse("int4:g64"))), model)
    report = quantize_model(model, resolved)
    out = tmp_path_factory.mktemp("gen") / "run"
    save_quantized(model, load_tokenizer("smollm2"), resolved, out, scales=report.scales)
    return out


def cli_json(args: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*args, "--json"]) == 0
    return json.loads(buf.getvalue())


@pytest.mark.parametrize("fmt", ["compressed-tensors", "mixq"])
def test_packed_generation_equals_fake_quant_generation(run_folder, fmt):
    out = run_folder.parent / fmt
    exported = cli_json(["export", str(run_folder), "--format", fmt, "--out", str(out)])
    assert exported["verified"] is True and exported["layers"] == 14
    packed = cli_json(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "8"])
    fake = cli_json(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "8", "--fake"])
    assert packed["packed_layers"] == {"weight_only": 14} and packed["fake_quant_layers"] == 0
    assert fake["packed_layers"] == {} and fake["fake_quant_layers"] == 14
    assert packed["text"] == fake["text"] and len(packed["text"]) > 0
