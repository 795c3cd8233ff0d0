"""``mixq quantize`` and ``mixq eval`` in-process on a tiny random Llama folder without a tokenizer.

Calibration and evaluation read a token file (``tokens.pt``, 5000 random ids), which needs no
tokenizer. Every usage error must exit 2 with one ``error:`` line on stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from mixq.cli import main
from mixq.model.run_folder import load_quantized
from mixq.plan import Plan


@pytest.fixture(scope="module")
def folders(tmp_path_factory, make_llama_folder):
    return make_llama_folder(tmp_path_factory.mktemp("cli"))


def quantize_args(root, out, *extra):
    return ["quantize", str(root / "src"), "--calib", str(root / "tokens.pt"), "--samples", "4",
            "--length", "32", "--batch-size", "2", "--out", str(out), *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def quantized(folders):
    """OUT written once by ``quantize --spec int4:g32 --algorithm gptq --json`` (and its stdout)."""
    out = folders / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(quantize_args(folders, out, "--spec", "int4:g32", "--algorithm", "gptq", "--json"))
    assert rc == 0
    return out, json.loads(buf.getvalue())


def test_quantize_json_and_folder(folders, quantized):
    out, result = quantized
    assert result["bits"]["quantized_bits_per_weight"] == pytest.approx(4 + 32 / 32)
    assert result["wall_s"] > 0 and result["out"] == str(out)
    assert result["calibration"] == {"samples": 4, "shape": [4, 32]}
    assert len(result["layers"]) == 14
    assert all(r["algorithm"] == "gptq" and r["loss"] <= r["rtn_loss"] * (1 + 1e-6) for r in result["layers"])
    meta = json.loads((out / "mixq.json").read_text())
    assert meta["model"] == str(folders / "src") and meta["report"]["bits"] == result["bits"]
    assert Plan.load(out / "plan.yaml").rules[-1].spec.algorithm == "gptq"
    model, _ = load_quantized(out)
    assert model.config.num_hidden_layers == 2


def test_quantize_refuses_existing_output(folders, quantized, capsys):
    out, _ = quantized
    before = (out / "mixq.json").read_text()
    capsys.readouterr()
    assert main(quantize_args(folders, out, "--spec", "int8:channel")) == 2
    line = one_error_line(capsys)
    assert "exists" in line and "--overwrite" in line
    assert (out / "mixq.json").read_text() == before


def test_quantize_overwrite_replaces(folders, capsys):
    out = folders / "again"
    assert main(quantize_args(folders, out, "--spec", "int8:channel", "--json")) == 0
    first = json.loads(capsys.readouterr().out)
    # one fp32 scale per output row: 8 + 32/64 for the 64-input layers, 8 + 32/128 for down_proj
    assert first["bits"]["quantized_bits_per_weight"] == pytest.approx((28672 * 8.5 + 8192 * 8.25) / 36864)
    assert main(quantize_args(folders, out, "--spec", "int4:g64", "--overwrite", "--json")) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["bits"]["quantized_bits_per_weight"] == pytest.approx(4.5)
    meta = json.loads((out / "mixq.json").read_text())
    assert meta["report"]["bits"] == second["bits"]
    assert sorted(p.name for p in folders.iterdir() if p.name.startswith(".")) == []


def test_quantize_never_over_the_source(folders, capsys):
    src = folders / "src"
    before = sorted(p.name for p in src.iterdir())
    assert main(quantize_args(folders, src, "--spec", "int8:channel", "--overwrite")) == 2
    assert "source" in one_error_line(capsys)
    assert sorted(p.name for p in src.iterdir()) == before


def test_bad_spec_exits_2_naming_it(folders, capsys):
    assert main(quantize_args(folders, folders / "bad", "--spec", "int4:gx")) == 2
    assert "int4:gx" in one_error_line(capsys)
    assert not (folders / "bad").exists()


def test_plan_group_size_error_names_the_layer(folders, capsys):
    plan = folders / "plan.yaml"
    plan.write_text("version: 1\nrules:\n"
                    "  - {pattern: '*.down_proj', weights: 'int4:g48', algorithm: gptq}\n")
    assert main(quantize_args(folders, folders / "badplan", "--plan", str(plan))) == 2
    line = one_error_line(capsys)
    assert "model.layers.0.mlp.down_proj" in line and "[64, 128]" in line and "48" in line
    assert not (folders / "badplan").exists()


def test_text_calibration_without_tokenizer_is_a_clear_error(folders, capsys):
    text = folders / "calib.txt"
    text.write_text("some words " * 200)
    args = quantize_args(folders, folders / "t", "--spec", "int4:g32", "--algorithm", "gptq")
    args[args.index("--calib") + 1] = str(text)
    assert main(args) == 2
    assert "token file" in one_error_line(capsys)


def test_eval_run_folder_against_its_source(folders, quantized, capsys):
    out, _ = quantized
    capsys.readouterr()
    args = ["eval", str(out), "--data", str(folders / "tokens.pt"), "--windows", "2", "--length", "32",
            "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == str(folders / "src")
    assert math.isfinite(result["ppl"]) and 50 < result["ppl"] < 400  # a random model over 128 tokens
    assert result["tokens"] == 2 * 31
    assert 0 < result["kl"] < 0.1 and 0.5 <= result["top1"] <= 1.0
    assert main(args[:-1] + ["--no-reference", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["kl"] is None and plain["ppl"] == pytest.approx(result["ppl"])


def test_eval_source_with_itself_as_reference(folders, capsys):
    args = ["eval", str(folders / "src"), "--data", str(folders / "tokens.pt"), "--windows", "2",
            "--length", "32", "--reference", str(folders / "src"), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6) and result["top1"] == 1.0


def test_evaluations_are_saved_in_the_run_folder(folders, tmp_path, capsys):
    import yaml

    out = tmp_path / "q"  # (quantize --eval uses the wiki text: this tiny model has no tokenizer)
    assert main(quantize_args(folders, out, "--spec", "int4:g32")) == 0
    assert (out / "environment.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["command"] == "quantize"
    args = ["eval", str(out), "--data", str(folders / "tokens.pt"), "--windows", "2", "--length", "32",
            "--out", str(out)]
    assert main(args) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["tokens"] == 2 * 31 and again["data"] == str(folders / "tokens.pt")
    assert yaml.safe_load((out / "config.yaml").read_text())["command"] == "quantize"  # kept
    assert yaml.safe_load((out / "config-eval.yaml").read_text())["command"] == "eval"
