"""``mixq profile`` → ``mixq search`` → ``mixq frontier`` in-process on a tiny random Llama folder.

Calibration and evaluation read a token file (``tokens.pt``, 5000 random ids), which needs no
tokenizer. Oracles: a brute-force search over every allocation (with q/k/v and gate/up tied), the
bit accounting of the candidates, and perplexities measured again outside the frontier command.
Every usage error exits 2 with one ``error:`` line and leaves no output folder behind.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mixq.cli import main
from mixq.plan import Plan, parse_candidates

CANDIDATES = "int4:g32,int4:g128,int8:channel,fp8_e4m3:channel,keep"  # int4:g128 fits down_proj only (in 128)
LAYERS = 2
LINEARS = 7 * LAYERS


def tiny_llama(folder, layers: int = LAYERS) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=layers, vocab_size=128, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    tiny_llama(root / "src")
    torch.save(torch.randint(0, 128, (5000,), generator=torch.Generator().manual_seed(0)), root / "tokens.pt")
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def no_leftovers(folder) -> None:
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


@pytest.fixture(scope="module")
def profiled(root):
    """``profile --json`` run once: the folder and the parsed stdout."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["profile", str(root / "src"), "--candidates", CANDIDATES, "--metrics",
                     "weight,fisher,hessian", "--calib", str(root / "tokens.pt"), "--samples", "4",
                     "--length", "32", "--batch-size", "2", "--hutchinson-samples", "2", "--validate", "6",
                     "--out", str(root / "prof"), "--json"])
    assert code == 0
    return root / "prof", json.loads(buf.getvalue())


def test_profile_json_and_files(root, profiled):
    from mixq.sensitivity.table import SensitivityTable

    prof, result = profiled
    assert result["layers"] == LINEARS and result["candidates"] == CANDIDATES.split(",")
    summary = {r["candidate"]: r for r in result["summary"]}
    assert summary["int4:g128"]["layers"] == LAYERS  # only down_proj reads 128 inputs
    assert summary["int4:g32"]["layers"] == LINEARS
    assert summary["int4:g32"]["bits_per_weight"] == pytest.approx(5.0)
    assert summary["keep"]["bits_per_weight"] == 16.0 and summary["keep"]["fisher"] == 0.0
    rho = result["validation"]["spearman"]
    assert set(rho) <= {"weight", "fisher", "hessian"} and rho
    assert all(r is None or -1.0 <= r <= 1.0 for r in rho.values())
    assert (prof / "profile.json").is_file() and (prof / "profile.csv").is_file()
    table = SensitivityTable.load(prof)
    assert [layer.name for layer in table.layers][:2] == ["model.layers.0.self_attn.q_proj",
                                                          "model.layers.0.self_attn.k_proj"]
    assert table.meta["calibration"] == str(root / "tokens.pt") and table.meta["length"] == 32
    g128 = table.metric("weight")[:, 1]
    assert [np.isnan(v) for v in g128] == [not x.name.endswith("down_proj") for x in table.layers]
    no_leftovers(root)


def test_profile_refuses_existing_output_and_empty_candidates(root, profiled, capsys):
    prof, _ = profiled
    before = (prof / "profile.json").read_text()
    code, _, err = run(capsys, "profile", root / "src", "--candidates", "int8:channel,keep", "--calib",
                       root / "tokens.pt", "--samples", "2", "--length", "32", "--out", prof)
    assert code == 2 and "--overwrite" in one_error_line(err)
    assert (prof / "profile.json").read_text() == before
    code, _, err = run(capsys, "profile", root / "src", "--candidates", " , ", "--out", root / "empty")
    assert code == 2 and "at least one candidate" in one_error_line(err)
    assert not (root / "empty").exists()


def _units() -> list[list[int]]:
    """Layer index groups that must share a candidate: q/k/v and gate/up of each block (profile order)."""
    units = []
    for b in range(LAYERS):
        base = 7 * b  # q, k, v, o, gate, up, down
        units += [[base, base + 1, base + 2], [base + 3], [base + 4, base + 5], [base + 6]]
    return units


def brute_force(scores: np.ndarray, bits: np.ndarray, limit: float) -> float:
    """The least total score of any allocation with total bits <= limit (NaN: not allowed)."""
    total_s, total_b = np.zeros(1), np.zeros(1)
    for unit in _units():
        s, b = scores[unit].sum(axis=0), bits[unit].sum(axis=0)  # [C]
        ok = np.isfinite(s)
        total_s = np.add.outer(total_s, s[ok]).ravel()
        total_b = np.add.outer(total_b, b[ok]).ravel()
    return float(total_s[total_b <= limit * (1 + 1e-12)].min())


def test_search_finds_the_brute_force_optimum(root, profiled, capsys):
    from mixq.sensitivity.table import SensitivityTable

    prof, _ = profiled
    table = SensitivityTable.load(prof)
    cands = parse_candidates(CANDIDATES)
    bits = np.array([[c.weight_bits(layer.shape) if c.fits(layer.shape) is None else np.nan for c in cands]
                     for layer in table.layers])  # [L, C]
    params = sum(layer.params for layer in table.layers)
    out = root / "s6"
    code, stdout, _ = run(capsys, "search", prof, "--budget", "6", "--metric", "fisher", "--algorithm", "rtn",
                          "--out", out, "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["optimal"] and result["method"] == "milp"
    best = brute_force(table.metric("fisher"), bits, 6 * params)
    assert result["predicted"] == pytest.approx(best, rel=1e-9)
    chosen = {r["name"]: r["candidate"] for r in result["layers"]}
    names = CANDIDATES.split(",")
    total = sum(bits[i, names.index(chosen[layer.name])] for i, layer in enumerate(table.layers))
    assert result["bits_per_weight"] == pytest.approx(total / params) and total / params <= 6 + 1e-9
    for unit in _units():
        assert len({chosen[table.layers[i].name] for i in unit}) == 1
    plan = Plan.load(out / "plan.yaml")
    for name, cand in chosen.items():
        spec, _ = plan.spec_for(name)
        expected = parse_candidates(cand)[0].spec
        assert spec.weights == expected.weights and (spec.is_keep or spec.algorithm == "rtn")
    assert plan.spec_for("lm_head")[0].is_keep
    assert json.loads((out / "search.json").read_text())["predicted"] == result["predicted"]
    assert len((out / "allocation.csv").read_text().splitlines()) == LINEARS + 1
    assert (out / "allocation.png").stat().st_size > 1000
    no_leftovers(root)


def test_search_pins_subset_and_table(root, profiled, capsys):
    prof, _ = profiled
    code, stdout, err = run(capsys, "search", prof, "--budget", "8", "--candidates",
                            "int4:g32,int8:channel,keep", "--pin", "*.down_proj=keep", "--out",
                            root / "pinned", "--layers")
    assert code == 0 and "bits/w" in stdout and "model.layers.1.mlp.down_proj" in stdout, err
    code, stdout, err = run(capsys, "search", prof, "--budget", "8", "--candidates", "int4:g32,int8:channel,keep",
                            "--pin", "*.down_proj=keep", "--out", root / "pinned", "--overwrite")
    assert code == 0 and "mlp.down_proj" in stdout and "keep x2" in stdout, err
    result = json.loads((root / "pinned" / "search.json").read_text())
    for row in result["layers"]:
        assert row["candidate"] == "keep" if row["name"].endswith("down_proj") else \
            row["candidate"] in ("int4:g32", "int8:channel", "keep")
    assert 7.44 < result["bits_per_weight"] <= 8 + 1e-9  # down_proj alone takes (2 * 8192 * 16) bits


def test_infeasible_budget_names_the_smallest_feasible(root, profiled, capsys):
    from mixq.sensitivity.table import SensitivityTable

    prof, _ = profiled
    table = SensitivityTable.load(prof)
    cands = parse_candidates(CANDIDATES)
    fits = [[c.weight_bits(layer.shape) for c in cands if c.fits(layer.shape) is None]
            for layer in table.layers]
    smallest = sum(min(b) for b in fits) / sum(layer.params for layer in table.layers)  # 4.8333
    code, _, err = run(capsys, "search", prof, "--budget", "2", "--out", root / "inf")
    line = one_error_line(err)
    found = re.search(r"smallest feasible is ([0-9.]+) bits/weight", line)
    assert code == 2 and "budget 2 bits/weight is infeasible" in line and found, line
    assert smallest <= float(found.group(1)) <= smallest + 1e-3  # 4.8333: rounded up, never below
    assert not (root / "inf").exists()
    code, _, err = run(capsys, "frontier", prof, "--budgets", "2,3", "--out", root / "inf")
    assert code == 2 and "infeasible" in one_error_line(err)
    assert not (root / "inf").exists()
    no_leftovers(root)


def test_constraint_file(root, profiled, capsys):
    prof, _ = profiled
    good = root / "good.yaml"
    good.write_text("budget: {bits: 6.5}\npin: {'model.layers.0.mlp.down_proj': int8:channel}\n")
    code, stdout, _ = run(capsys, "search", prof, "--constraints", good, "--out", root / "c", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["budget"] == 6.5 and result["bits_per_weight"] <= 6.5 + 1e-9
    chosen = {r["name"]: r["candidate"] for r in result["layers"]}
    assert chosen["model.layers.0.mlp.down_proj"] == "int8:channel"
    bad = root / "bad.yaml"
    bad.write_text("budget: {bits: 6}\npin: {'model.layers.40.*': keep}\n")
    code, _, err = run(capsys, "search", prof, "--constraints", bad, "--out", root / "c2")
    assert code == 2 and "model.layers.40.*" in one_error_line(err)
    assert not (root / "c2").exists()


def test_profile_of_another_model_is_refused(root, profiled, capsys):
    prof, _ = profiled
    tiny_llama(root / "other", layers=3)
    for argv in (["search", prof, "--budget", "6", "--model", root / "other", "--out", root / "o"],
                 ["frontier", prof, "--budgets", "6", "--measure", "--model", root / "other", "--out",
                  root / "o"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "profile" in one_error_line(err)
        assert not (root / "o").exists()


def test_bad_arguments(root, profiled, capsys):
    prof, _ = profiled
    for extra, words in ((["--budgets", "4,x"], "--budgets"),
                         (["--budgets", "6", "--families", "joint,fp"], "fp"),
                         (["--budgets", "6", "--candidates", "int5:g32"], "int5:g32"),
                         (["--budgets", "6", "--pin", "nonsense"], "PATTERN=CANDIDATE")):
        code, _, err = run(capsys, "frontier", prof, *extra, "--out", root / "bad")
        assert code == 2 and words in one_error_line(err)
        assert not (root / "bad").exists()


@pytest.fixture(scope="module")
def measured(root, profiled):
    import contextlib
    import io

    prof, _ = profiled
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["frontier", str(prof), "--budgets", "5.5,7", "--families", "joint,int,float",
                     "--algorithm", "rtn", "--measure", "--samples", "4", "--eval-windows", "2", "--out",
                     str(root / "fr"), "--json"])
    assert code == 0
    return root / "fr", json.loads(buf.getvalue())


def test_frontier_points_and_files(root, measured):
    fr, result = measured
    by = {p["label"]: p for p in result["points"]}
    assert {"joint@5.5", "joint@7", "int@5.5", "int@7"} <= set(by)
    assert not any(p["family"] == "float" for p in result["points"])  # fp8 (8.5) and keep (16) exceed 7
    assert any(n.startswith("float:") and "infeasible" in n for n in result["notes"])
    uniform = {p["label"]: p for p in result["points"] if p["family"] == "uniform"}
    assert set(uniform) == {"int4:g32", "int8:channel", "fp8_e4m3:channel", "keep"}  # int4:g128 fits 2 layers
    assert uniform["int4:g32"]["bits_per_weight"] == pytest.approx(5.0)
    assert uniform["keep"]["bits_per_weight"] == 16
    for p in result["points"]:
        if p["label"] in ("int8:channel", "fp8_e4m3:channel"):  # uniform above the largest budget: not measured
            assert p["measured"] is None and not p["pareto"]
        else:
            assert math.isfinite(p["measured"]) and p["measured"] == p["ppl"] and p["quantize_s"] >= 0
        assert (fr / p["plan"]).is_file()
        assert p["family"] == "uniform" or p["bits_per_weight"] <= p["budget"] + 1e-9
    assert by["int@7"]["predicted"] >= by["joint@7"]["predicted"] - 1e-12  # fewer choices, never better
    front = [p for p in result["points"] if p["pareto"]]
    assert front and all(not (q["bits_per_weight"] <= p["bits_per_weight"] and q["measured"] < p["measured"])
                         for p in front for q in result["points"] if q is not p and q["measured"] is not None)
    assert json.loads((fr / "frontier.json").read_text())["points"] == result["points"]
    assert "| joint@7 | joint |" in (fr / "frontier.md").read_text()
    assert (fr / "frontier.png").stat().st_size > 1000
    assert sorted(p.name for p in (fr / "allocation").iterdir()) == ["int@5.5.png", "int@7.png",
                                                                    "joint@5.5.png", "joint@7.png"]
    no_leftovers(root)


def test_frontier_measurements_match_a_separate_run(root, measured):
    from mixq.pipeline import evaluate, quantize

    fr, result = measured
    by = {p["label"]: p for p in result["points"]}
    data = str(root / "tokens.pt")
    fp = evaluate(root / "src", compare=False, data=data, windows=2, length=32)
    assert by["keep"]["measured"] == pytest.approx(fp.ppl, rel=1e-6)
    plan = Plan.load(fr / by["joint@7"]["plan"])
    outcome = quantize(str(root / "src"), plan, calib=data, samples=4, length=32)
    again = evaluate(root / "src", model=outcome.model, compare=False, data=data, windows=2, length=32)
    assert by["joint@7"]["measured"] == pytest.approx(again.ppl, rel=1e-6)


def test_frontier_predicted_only_prints_a_table(root, profiled, capsys):
    prof, _ = profiled
    code, stdout, _ = run(capsys, "frontier", prof, "--budgets", "6", "--metric", "weight", "--out",
                          root / "fp")
    assert code == 0 and "joint@6" in stdout and "predicted" in stdout
    result = json.loads((root / "fp" / "frontier.json").read_text())
    assert result["measured"] is False and all(p["measured"] is None for p in result["points"])
