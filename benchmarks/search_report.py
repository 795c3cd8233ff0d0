"""Put measured rows (from ``search_table.py``) into a predicted frontier and redraw its report.

``mixq frontier PROFILE ... --out DIR`` (without ``--measure``) writes ``DIR/frontier.json`` and the
plans; ``search_table.py DIR/plans/*.yaml --tag TAG`` measures them in parallel processes. This script
joins the two by plan file, fills ``measured`` / ``ppl`` / ``quantize_s`` for every measured point, marks
the Pareto set on the measured values, and writes ``frontier-measured.{json,md,png}`` into ``DIR`` (and
optionally copies the plot elsewhere, e.g. ``docs/img``).

    python benchmarks/search_report.py runs/search-smollm2/frontier-gptq --tag gptq \
        --profile runs/search-smollm2/profile [--extra gptq-uniform] [--png docs/img/frontier-smollm2-gptq.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def same_plan(a: Path, b: Path, names: list[str]) -> bool:
    """Whether two plan files give every module in ``names`` the same layer spec."""
    from mixq.plan import Plan

    pa, pb = Plan.load(a), Plan.load(b)
    return all(pa.spec_for(n)[0] == pb.spec_for(n)[0] for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("frontier", type=Path, help="a frontier folder written without --measure")
    parser.add_argument("--results", type=Path, nargs="+", default=[Path("benchmarks/results/search-smollm2.json")],
                        help="result files of search_table.py (rows merged)")
    parser.add_argument("--tag", required=True, help="row-name prefix used by search_table.py for these plans")
    parser.add_argument("--extra", nargs="*", default=[],
                        help="other tags whose rows stand in for uniform points of the same plan file name")
    parser.add_argument("--profile", type=Path, required=True, help="the profile folder the frontier came from")
    parser.add_argument("--png", type=Path, default=None, help="also copy the plot here")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    from mixq.eval.search_report import frontier_markdown, frontier_plot, rank_correlation
    from mixq.fileio import atomic_write_text

    report = json.loads((args.frontier / "frontier.json").read_text())
    names = [layer["name"] for layer in json.loads((args.profile / "profile.json").read_text())["layers"]]
    names += ["lm_head"]
    rows = {name: row for path in args.results for name, row in json.loads(path.read_text())["rows"].items()}
    by_text = {}  # identical plans (e.g. float@4.25 and uniform mxfp4) share one measurement
    for p in report["points"]:
        stem = Path(p["plan"]).stem
        for tag in (args.tag, *args.extra):
            row = rows.get(f"{tag}/{stem}")
            if row is None or "error" in row or not Path(row["plan"]).is_file():
                continue
            # only a row of the same plan counts: the same spec for every layer of the profile
            if same_plan(Path(row["plan"]), args.frontier / p["plan"], names):
                by_text[(args.frontier / p["plan"]).read_text()] = (f"{tag}/{stem}", row)
    for p in report["points"]:
        found = by_text.get((args.frontier / p["plan"]).read_text())
        if found is not None:
            name, row = found
            p.update(measured=row["ppl"], ppl=row["ppl"], kl=row.get("kl"), quantize_s=row["quantize_s"],
                     measured_by=name)
    measured = [p for p in report["points"] if p.get("measured") is not None]
    for p in report["points"]:
        p["pareto"] = p in measured and not any(
            q["bits_per_weight"] <= p["bits_per_weight"] and q["measured"] < p["measured"] for q in measured)
    report["measured_name"] = "perplexity"
    report["spearman"] = rank_correlation([p["predicted"] for p in measured], [p["measured"] for p in measured])
    atomic_write_text(args.frontier / "frontier-measured.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(args.frontier / "frontier-measured.md", frontier_markdown(report))
    png = frontier_plot(report["points"], args.frontier / "frontier-measured.png", title=args.title)
    if args.png is not None:
        shutil.copyfile(png, args.png)
    print(frontier_markdown(report))


if __name__ == "__main__":
    main()
