"""``mixq report`` pages and ``mixq compare`` rows from folders written by the real commands."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from mixq.report import RunError, compare_runs, load_run, render_report, write_report


@pytest.mark.parametrize("kind", ["profile", "frontier", "quantize", "train", "export"])
def test_each_kind_is_recognised_and_rendered_self_contained(runs, kind):
    run = load_run(runs[kind])
    assert run.kind == kind
    html = render_report(run)
    assert html.startswith("<!DOCTYPE html>") and '<body data-errors="0"' in html
    assert "<svg" in html and 'id="environment"' in html
    # nothing is fetched: no external scripts, styles, images or fonts
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", html)
    assert not [u for u in re.findall(r"https?://[^\"' ]+", html) if u != "http://www.w3.org/2000/svg"]


def test_frontier_page_has_the_plot_baselines_hover_and_heat_maps(runs):
    run = load_run(runs["frontier"])
    html = render_report(run)
    points = run.data["points"]
    searched = [p for p in points if p["family"] != "uniform"]
    assert 'id="frontier-plot"' in html and 'id="frontier-predicted"' in html
    assert "unquantized (" in html  # keep as the dashed reference line
    assert html.count('class="pt"') >= 2 * len(searched)  # both y axes
    for p in searched:  # every searched point: a clickable marker whose tip names the plan and its specs
        assert f'data-key="{p["label"]}"' in html
    tip = re.search(r'data-tip="(joint@5\.5 \(joint\)[^"]*)"', html).group(1)
    assert "bits/weight" in tip and "perplexity" in tip and "plan: " in tip and " x" in tip
    assert html.count('class="heat"') == len(searched)  # one allocation heat map per searched plan
    assert html.count('<option value="') == 2 + len(searched)  # y-axis switch + plan switch
    assert "block 0" in html and "self_attn.q_proj" in html


def test_quantize_train_export_profile_pages_show_their_data(runs):
    q = render_report(load_run(runs["quantize"]))
    assert "int4:g32 rtn x14" in q and 'id="loss-bars"' in q and q.count("<tr>") >= 15
    t = render_report(load_run(runs["train"]))
    assert 'id="train-plot"' in t and "heldout_loss" in t and "torch threads" in t  # environment.json shown
    e = render_report(load_run(runs["export"]))
    assert 'id="bytes-bars"' in e and "bits4" in e
    p = render_report(load_run(runs["profile"]))
    assert 'id="sens-weight"' in p and 'id="sens-fisher"' in p and "median fisher" in p


def test_text_from_the_folder_is_escaped(runs, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(runs["frontier"], folder)
    data = json.loads((folder / "frontier.json").read_text())
    data["model"] = "<script>alert(1)</script>"
    data["notes"] = ["<b>note</b>"]
    (folder / "frontier.json").write_text(json.dumps(data))
    html = render_report(load_run(folder))
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html and "&lt;b&gt;note" in html


def test_unknown_and_missing_folders_say_what_is_understood(tmp_path):
    with pytest.raises(RunError, match=r"not a mixq output folder; expected one of frontier: frontier\.json"):
        load_run(tmp_path)
    with pytest.raises(RunError, match="no file or folder"):
        load_run(tmp_path / "nothing")
    (tmp_path / "profile.json").write_text("{not json")
    with pytest.raises(RunError, match="expected readable JSON"):
        load_run(tmp_path)


def test_cli_report_writes_the_page_and_errors_are_one_line(runs, cli, tmp_path, capsys):
    from mixq.cli import main

    result = json.loads(cli("report", runs["train"], "--out", tmp_path / "t.html", "--json"))
    assert result["kind"] == "train" and (tmp_path / "t.html").read_text().startswith("<!DOCTYPE html>")
    _, path = write_report(runs["quantize"] / "mixq.json")  # a file inside the folder: its folder
    assert path == runs["quantize"] / "report.html" and path.is_file()
    for argv in (["report", str(tmp_path)], ["report", str(runs["train"]), "--out", str(tmp_path)]):
        capsys.readouterr()
        assert main(argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), lines


def test_compare_puts_kinds_side_by_side(runs, cli):
    rows = compare_runs([runs[k] for k in ("frontier", "quantize", "train", "export", "profile")])
    by = {r["kind"]: r for r in rows}
    assert by["quantize"]["bits_per_weight"] == pytest.approx(5.0) and by["quantize"]["plan"] == "int4:g32 x14"
    assert by["train"]["bits_per_weight"] is None and by["train"]["metric"] == "heldout_loss"
    assert by["train"]["torch"] and by["quantize"]["torch"]  # every run folder records its environment
    best = by["frontier"]
    measured = [p["measured"] for p in load_run(runs["frontier"]).data["points"]
                if p["family"] != "uniform" and p["measured"] is not None]
    assert best["metric"] == "perplexity" and best["value"] == pytest.approx(min(measured))
    assert by["profile"]["value"] is None and by["export"]["plan"] == "mixq: int4:g32 x14"
    text = cli("compare", runs["quantize"], runs["train"])
    assert "int4:g32 x14" in text and "heldout_loss" in text and " - " in text
    assert [r["kind"] for r in json.loads(cli("compare", runs["train"], "--json"))] == ["train"]
