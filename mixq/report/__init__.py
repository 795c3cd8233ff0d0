"""Reports of mixq output folders: ``mixq report`` (a self-contained interactive HTML page) and
``mixq compare`` (runs side by side)."""

from mixq.report.compare import COLUMNS, compare_runs, compare_table, run_summary
from mixq.report.render import render_report, write_report
from mixq.report.runs import KINDS, Run, RunError, detect_kind, load_run

__all__ = ["COLUMNS", "KINDS", "Run", "RunError", "compare_runs", "compare_table", "detect_kind", "load_run",
           "render_report", "run_summary", "write_report"]
