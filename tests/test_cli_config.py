"""Run configs (--config / --set), config.yaml in run folders, and the CLI's exit statuses."""

from __future__ import annotations

import json

import pytest
import yaml

from mixq import cli
from mixq.cli_config import ConfigError, expand_argv


@pytest.fixture(scope="module")
def parser():
    return cli.build_parser()


def test_a_config_is_its_flags_and_typed_flags_win(parser, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: smollm2\nspec: int4:g64\nalgorithm: gptq\nsamples: 32\nstatic_inputs: true\n"
                   "act-order: false\n")
    argv = expand_argv(["quantize", "--config", str(cfg), "--samples", "8"], parser)
    assert argv[:2] == ["quantize", "smollm2"]
    args = parser.parse_args(argv)
    assert (args.model, args.spec, args.algorithm, args.static_inputs, args.act_order) == \
        ("smollm2", "int4:g64", "gptq", True, False)
    assert args.samples == 8  # typed on the command line: wins over the file
    args = parser.parse_args(expand_argv(["quantize", "--config", str(cfg), "--set", "samples=16",
                                          "--set=algorithm=rtn"], parser))
    assert (args.samples, args.algorithm) == (16, "rtn")  # --set wins over the file
    typed = parser.parse_args(expand_argv(["quantize", "minilm", "--config", str(cfg)], parser))
    assert typed.model == "minilm"  # a typed positional replaces the file's


def test_the_command_can_come_from_the_config(parser, tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("command: train\ntask: tiny-lm\nsteps: 3\nrecipe: fp8\n")
    args = parser.parse_args(expand_argv(["--config", str(cfg), "--out", "x"], parser))
    assert (args.command, args.task, args.steps, args.recipe) == ("train", "tiny-lm", 3, "fp8")
    with pytest.raises(ConfigError, match="not 'mixq quantize'"):
        expand_argv(["quantize", "--config", str(cfg)], parser)


@pytest.mark.parametrize("text, match", [
    ("samples: 3\nsampels: 4\n", "no option 'sampels' .*did you mean samples"),
    ("static-inputs: maybe\n", "switch: expected true or false"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [\n", "expected valid YAML"),
])
def test_bad_configs_say_what_and_where(parser, tmp_path, text, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        expand_argv(["quantize", "smollm2", "--config", str(cfg)], parser)


def test_bad_config_input_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["quantize", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert cli.main(["quantize", "smollm2", "--set", "novalue"]) == 2
    assert cli.main(["quantize", "--set", "model=smollm2"]) == 2  # positionals are not --set
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


def test_a_run_folder_keeps_its_config_and_the_config_repeats_the_run(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli.main(["train", "--task", "tiny-lm", "--steps", "2", "--recipe", "fp8", "--out", str(first)]) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["command"] == "train" and saved["task"] == "tiny-lm" and saved["steps"] == 2
    assert "out" not in saved and "debug" not in saved
    assert cli.main(["train", "--config", str(first / "config.yaml"), "--out", str(second)]) == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (first, second))
    assert a["losses"] == b["losses"] and a["recipe"] == b["recipe"] == "fp8"


def test_exit_statuses(monkeypatch, capsys):
    def missing(args):
        raise ModuleNotFoundError("No module named 'compressed_tensors'", name="compressed_tensors")

    def bug(args):
        raise RuntimeError("something impossible")

    def recipe(args):
        raise KeyError("unknown training recipe 'fp9'")

    for fn, status, text in [(missing, 3, "pip install 'mixq[export]'"), (bug, 1, "--debug"),
                             (recipe, 2, "error: unknown training recipe 'fp9'")]:
        monkeypatch.setitem(cli.COMMANDS, "formats", fn)
        assert cli.main(["formats"]) == status
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1
    monkeypatch.setitem(cli.COMMANDS, "formats", bug)
    with pytest.raises(RuntimeError):
        cli.main(["formats", "--debug"])


def test_every_command_has_an_example_json_output_and_config(parser):
    from mixq.cli_config import _subparsers

    for name, sub in _subparsers(parser).items():
        text = sub.format_help()
        assert "example" in text, name
        flags = {s for a in sub._actions for s in a.option_strings}
        assert {"--json", "--config", "--set", "--debug"} <= flags, name
