"""``mixq report``: a self-contained interactive HTML page for any mixq output folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mixq.fileio import atomic_write_text
from mixq.report.layers import environment_section
from mixq.report.page import page
from mixq.report.runs import Run, load_run
from mixq.report.sections_runs import export_sections, quantize_sections, train_sections
from mixq.report.sections_search import frontier_sections, profile_sections, search_sections

SECTIONS: dict[str, Callable[[Run], list[str]]] = {
    "frontier": frontier_sections, "search": search_sections, "profile": profile_sections,
    "quantize": quantize_sections, "train": train_sections, "export": export_sections,
}
REPORT = "report.html"


def render_report(run: Run) -> str:
    """The HTML text of the report of ``run`` (one document, no external resources)."""
    d = run.data
    version = d.get("mixq_version") or (d.get("meta") or {}).get("mixq_version")
    model = d.get("model") or d.get("task") or d.get("source") or ""
    sections = SECTIONS[run.kind](run) + [environment_section(run.environment, version)]
    return page(f"mixq {run.kind}: {run.name}", f"{run.path}" + (f" — {model}" if model else ""), sections)


def write_report(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> tuple[Run, Path]:
    """Read the output folder at ``path`` and write its report to ``out`` (default ``PATH/report.html``),
    atomically; returns the run and the report's path. Raises :class:`mixq.report.RunError` for a path that
    is not a mixq output folder."""
    run = load_run(path)
    target = Path(out) if out is not None else run.path / REPORT
    if target.is_dir():
        raise ValueError(f"--out expected an HTML file name, found the folder {target}; "
                         f"pass e.g. {target / REPORT}")
    return run, atomic_write_text(target, render_report(run))
