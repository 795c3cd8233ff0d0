"""The ``mixq`` command line, run in-process through ``mixq.cli.main`` on a tiny local HF model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mixq
from mixq.cli import UserError, main
from mixq.model import ModelLoadError
from mixq.quant import SpecError

# q/k/v/o and the MLP read the hidden size 96: g64 does not divide it; down_proj reads 192, g64 fits.
HIDDEN, INTERMEDIATE, LAYERS = 96, 192, 2
LINEARS = 7 * LAYERS


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama saved as a Hugging Face folder (nothing downloaded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_formats_table_lists_every_named_format(capsys):
    code, out, _ = run(capsys, "formats")
    assert code == 0
    for name in ("int4", "fp8_e4m3", "e8m0", "nf4", "mxfp4", "nvfp4", "nvint4"):
        assert name in out


def test_formats_json(capsys):
    code, out, err = run(capsys, "formats", "--json")
    assert code == 0 and err == ""
    rows = {r["name"]: r for r in json.loads(out)}
    assert list(rows) == mixq.formats.names()
    assert rows["int4"]["kind"] == "int" and rows["int4"]["num_values"] == 16
    assert rows["fp8_e4m3"]["max"] == 448.0 and rows["fp8_e4m3"]["num_values"] == 253
    assert rows["e8m0"]["kind"] == "e8m0"
    assert rows["nf4"]["kind"] == "grid"
    assert rows["fp32"]["num_values"] is None  # 2**32 codes are not enumerated
    mx, nv = rows["mxfp4"], rows["nvfp4"]
    assert (mx["kind"], mx["bits_per_value"], mx["scale"], mx["tensor_scale"]) == ("block", 4.25, "e8m0/32",
                                                                                    None)
    assert (nv["bits_per_value"], nv["scale"], nv["tensor_scale"]) == (4.5, "fp8_e4m3/16", "fp32")
    assert nv["max"] == 6.0 and nv["block_max"] == 6.0 * 448.0


def test_study_json_files_and_group_size_skip(tiny_llama, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, _ = run(capsys, "study", str(tiny_llama), "--specs", "int8:channel,int4:g64,mxfp4",
                       "--out", str(out_dir), "--json")
    assert code == 0
    report = json.loads(out)  # stdout holds the JSON and nothing else
    summary = {s["spec"]: s for s in report["summary"]}
    assert report["layers"] == LINEARS  # tied lm_head and the embedding are left out
    assert summary["int8:channel"]["layers"] == LINEARS and summary["int8:channel"]["layers_skipped"] == 0
    g64 = summary["int4:g64"]
    assert (g64["layers"], g64["layers_skipped"]) == (LAYERS, LINEARS - LAYERS)  # only down_proj fits
    assert "group size 64 does not divide" in g64["skip_reasons"][0] and "96" in g64["skip_reasons"][0]
    assert summary["mxfp4"]["bits_per_value"] == 4.25
    assert 25 < summary["int8:channel"]["sqnr_mean_db"] < 60 and not summary["int8:channel"]["on_grid"]
    assert {p.name for p in out_dir.iterdir()} == {"study.json", "study.csv", "study.png",
                                                "environment.json", "config.yaml"}  # no temp files
    assert (out_dir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out_dir / "study.json").read_text())
    assert len(saved["layers"]) == 3 * LINEARS
    rows = list(csv.DictReader((out_dir / "study.csv").open()))
    assert len(rows) == 3 * LINEARS
    skipped = [r for r in rows if r["skipped"]]
    assert len(skipped) == LINEARS - LAYERS and all(r["sqnr_db"] == "" for r in skipped)


def test_study_table_limit_and_embeddings(tiny_llama, tmp_path, capsys):
    code, out, err = run(capsys, "study", str(tiny_llama), "--specs", "int4:g32, nvfp4", "--out",
                         str(tmp_path), "--limit-layers", "3", "--include-embeddings")
    assert code == 0
    assert "int4:g32" in out and "nvfp4" in out and "3 layers" in out
    assert "embed_tokens" in (tmp_path / "study.csv").read_text()  # the embedding comes first


@pytest.mark.parametrize("specs, words", [
    ("int4:g64,int4:gg", ["'gg'", "int4:gg"]),
    ("fp5_e9m9", ["'fp5_e9m9'", "exponent bits"]),
    ("int4:g32,foo4", ["unknown format", "foo4"]),
    ("mxfp4:asym", ["asymmetric"]),
    (",", ["--specs"]),
])
def test_bad_spec_is_one_line_exit_2(tiny_llama, tmp_path, capsys, specs, words):
    code, out, err = run(capsys, "study", str(tiny_llama), "--specs", specs, "--out", str(tmp_path / "o"))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err
    assert not (tmp_path / "o").exists()  # failed before any work


def test_bad_model_path(tmp_path, capsys):
    code, _, err = run(capsys, "study", str(tmp_path / "missing"), "--specs", "int8")
    assert code == 2 and err.count("\n") == 1 and "no such name or path" in err
    code, _, err = run(capsys, "study", str(tmp_path), "--specs", "int8")  # a folder without config.json
    assert code == 2 and "config.json" in err


def test_debug_shows_the_exception(tiny_llama, tmp_path):
    with pytest.raises(UserError) as err:
        main(["--debug", "study", str(tiny_llama), "--specs", "int4:bogus"])
    assert isinstance(err.value.__cause__, SpecError)
    with pytest.raises(ModelLoadError):
        main(["study", str(tmp_path / "missing"), "--specs", "int8", "--debug"])


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["study"]) == 2
    assert main(["--version"]) == 0
    assert "mixq" in capsys.readouterr().out


def test_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "mixq", "formats", "--json"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert {r["name"] for r in json.loads(res.stdout)} == set(mixq.formats.names())
