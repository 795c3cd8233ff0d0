"""``mixq report`` and ``mixq compare``: an interactive HTML page of a run folder, and runs side by side;
the work is in :mod:`mixq.report`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REPORT_EXAMPLE = """example:
  mixq report runs/frontier                      # writes runs/frontier/report.html
  mixq report runs/q-int4 --out q-int4.html
  mixq report runs/train-fp8 --json

understood folders: mixq frontier, search, profile, quantize, train and export outputs."""

COMPARE_EXAMPLE = """example:
  mixq compare runs/q-int4 runs/q-mxfp4 runs/frontier
  mixq compare runs/train-* --json"""


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``report`` and ``compare`` on the subcommand parser ``sub``."""
    p = sub.add_parser("report", parents=[common], help="write an interactive HTML report of a run folder",
                       description="Write a self-contained HTML page (no network needed) for a mixq output "
                                   "folder: frontier with uniform baselines, allocation heat maps, "
                                   "sensitivity, per-layer tables, training curves, sizes.",
                       epilog=REPORT_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a folder written by a mixq command (or a file in it)")
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default: RUN/report.html)")
    p.add_argument("--json", action="store_true", help="print the report's path and the run's summary as JSON")

    p = sub.add_parser("compare", parents=[common], help="put run folders side by side",
                       description="One row per run folder (any kinds): model, plan, bits/weight, quality "
                                   "metric, time and versions; '-' where a column does not apply.",
                       epilog=COMPARE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="folders written by mixq commands")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def cmd_report(args: argparse.Namespace, consoles: Any) -> int:
    """``mixq report``: write the page, print where it is."""
    from mixq.report import run_summary, write_report

    run, path = write_report(args.run, args.out)
    if args.json:
        print(json.dumps({"out": str(path), "kind": run.kind, "summary": run_summary(run)}, indent=1))
        return 0
    out, _ = consoles()
    out.print(f"{run.kind} report: {path}")
    return 0


def cmd_compare(args: argparse.Namespace, consoles: Any) -> int:
    """``mixq compare``: the table, or a JSON list of rows."""
    from mixq.report import compare_runs, compare_table

    rows = compare_runs(args.runs)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    out, _ = consoles()
    out.print(compare_table(rows))
    return 0
