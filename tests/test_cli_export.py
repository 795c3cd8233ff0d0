"""``mixq export`` in-process on a tiny random Llama folder (no tokenizer; token-file calibration).

Every export is reloaded by the command itself (logits must be identical); the tests reload it once
more through ``mixq.load`` and check the format chosen, the size on disk against the accounting,
and that errors leave nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

import mixq
from mixq.cli import main
from mixq.export import kind_of
from mixq.model.run_folder import load_quantized

TEST = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def root(tmp_path_factory, make_llama_folder):
    return make_llama_folder(tmp_path_factory.mktemp("cli-export"))


def run_json(args: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([*args, "--json"])
    assert rc == 0
    return json.loads(buf.getvalue())


def calib(root) -> list[str]:
    return ["--calib", str(root / "tokens.pt"), "--samples", "4", "--length", "32"]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TEST).logits


@pytest.fixture(scope="module")
def gptq_run(root):
    out = root / "run-gptq"
    assert main(["quantize", str(root / "src"), "--spec", "int4:g32:mse", "--algorithm", "gptq",
                 "--batch-size", "2", "--out", str(out), *calib(root)]) == 0
    return out


def test_a_gptq_run_exports_to_compressed_tensors_and_reloads_identically(root, gptq_run):
    out = root / "ct"
    result = run_json(["export", str(gptq_run), "--out", str(out)])
    assert result["format"] == "compressed-tensors" and result["verified"] is True
    assert result["max_logit_diff"] == 0.0 and result["layers"] == 14
    assert result["schemes"] == {"int4:g32:mse": 14}
    assert kind_of(out) == "compressed-tensors"
    assert torch.equal(logits(mixq.load(out)), logits(load_quantized(gptq_run)[0]))


def test_auto_falls_back_to_mixq_for_ternary_and_sizes_match_the_accounting(root):
    plan = root / "ternary.yaml"
    plan.write_text("version: 1\nrules:\n  - {pattern: '*.mlp.*', weights: 'ternary:channel:mse'}\n"
                    "  - {pattern: '*', weights: 'fp6_e2m3:g32'}\n")
    out = root / "mixq-format"
    result = run_json(["export", str(root / "src"), "--plan", str(plan), "--out", str(out), *calib(root)])
    assert result["format"] == "mixq" and result["verified"] is True
    assert any("ternary" in reason or "grid" in reason for reason in result["unsupported"].values())
    assert kind_of(out) == "mixq"
    # the tiny model's safetensors header is ~5 % of its bytes; the payload is the accounting to the byte
    assert result["payload_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert result["size_ratio"] > result["payload_ratio"]


def test_asking_for_compressed_tensors_it_cannot_express_names_the_layers(root, capsys):
    plan = root / "grid.yaml"
    plan.write_text("version: 1\nrules:\n  - {pattern: '*', weights: 'nf4:g32'}\n")
    out = root / "refused"
    assert main(["export", str(root / "src"), "--plan", str(plan), "--format", "compressed-tensors",
                 "--out", str(out), *calib(root)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj" in err and "nf4" in err
    assert not out.exists()


def test_existing_output_and_the_source_are_refused_before_any_work(root, gptq_run, capsys):
    out = root / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(gptq_run), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    before = sorted(p.name for p in gptq_run.iterdir())
    assert main(["export", str(gptq_run), "--out", str(gptq_run), "--overwrite"]) == 2
    assert "source" in capsys.readouterr().err
    assert sorted(p.name for p in gptq_run.iterdir()) == before


def test_a_model_without_a_plan_is_a_clear_error(root, capsys):
    assert main(["export", str(root / "src"), "--out", str(root / "noplan")]) == 2
    assert "--plan" in capsys.readouterr().err


def test_a_run_with_input_quantizers_exports_from_the_folder_and_from_a_plan(root):
    run = root / "run-fp8"
    assert main(["quantize", str(root / "src"), "--spec", "fp8_e4m3:channel", "--inputs", "fp8_e4m3:token",
                 "--out", str(run), *calib(root)]) == 0
    from_run = run_json(["export", str(run), "--out", str(root / "ct-fp8")])
    assert from_run["format"] == "compressed-tensors" and from_run["verified"] is True
    assert from_run["schemes"] == {"fp8_e4m3:channel@fp8_e4m3:token": 14}
    plan = root / "fp8.yaml"
    plan.write_text("version: 1\nrules:\n  - {pattern: lm_head, keep: true}\n"
                    "  - {pattern: '*', weights: 'fp8_e4m3:channel', inputs: 'fp8_e4m3:token'}\n")
    from_plan = run_json(["export", str(root / "src"), "--plan", str(plan), "--format", "mixq",
                          "--out", str(root / "mixq-fp8"), *calib(root)])
    assert from_plan["format"] == "mixq" and from_plan["verified"] is True
    assert torch.equal(logits(mixq.load(root / "ct-fp8")), logits(mixq.load(root / "mixq-fp8")))


def test_exported_folders_evaluate_like_the_run_they_came_from(root, gptq_run):
    from mixq.pipeline import evaluate

    out = root / "eval-mixq"
    run_json(["export", str(gptq_run), "--format", "mixq", "--out", str(out)])
    kw = {"data": str(root / "tokens.pt"), "windows": 2, "length": 32}
    a, b = evaluate(gptq_run, **kw), evaluate(out, **kw)
    assert b.reference == a.reference == str(root / "src")
    assert b.ppl == a.ppl and b.kl == a.kl
