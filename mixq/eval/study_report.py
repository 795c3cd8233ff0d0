"""Study outputs: JSON, CSV, a rich table, and atomic writing of the files of a study run.

JSON conventions: infinite SQNR (an exact reconstruction) is written as the string ``"inf"``
(``"-inf"`` for the negative one), NaN (no value: a spec that applied to no layer, or NaN weights)
as ``null``; ``float(value)`` reads the strings back.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixq.fileio import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from rich.table import Table

    from mixq.eval.study import LayerResult, SpecSummary, StudyResult

CSV_FIELDS = ("layer", "shape", "numel", "spec", "family", "bits_per_value", "mse", "sqnr_db", "skipped")


def json_number(v: float | None) -> float | str | None:
    """A float for JSON: ``inf`` as ``"inf"``, NaN and None as None."""
    if v is None or math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def summary_to_json(s: SpecSummary) -> dict[str, Any]:
    """One spec's summary as a JSON-ready dict."""
    return {
        "spec": s.spec, "family": s.family, "bits_per_value": json_number(s.bits_per_value),
        "sqnr_mean_db": json_number(s.sqnr_mean_db), "sqnr_median_db": json_number(s.sqnr_median_db),
        "sqnr_min_db": json_number(s.sqnr_min_db), "sqnr_global_db": json_number(s.sqnr_global_db),
        "rel_mse": json_number(s.rel_mse), "layers": s.layers, "layers_skipped": s.layers_skipped,
        "skip_reasons": list(s.skip_reasons), "layers_on_grid": s.layers_on_grid, "on_grid": s.on_grid,
        "note": s.note,
    }


def layer_to_json(r: LayerResult) -> dict[str, Any]:
    """One (layer, spec) row as a JSON-ready dict."""
    return {
        "layer": r.layer, "shape": list(r.shape), "numel": r.numel, "spec": r.spec,
        "bits_per_value": json_number(r.bits_per_value), "mse": json_number(r.mse),
        "sqnr_db": json_number(r.sqnr_db), "skipped": r.skipped,
    }


def result_to_json(result: StudyResult, layers: bool = True) -> dict[str, Any]:
    """The whole study (``layers=False``: without the per-layer rows) as a JSON-ready dict."""
    from mixq.eval.study import ON_GRID_DB

    out: dict[str, Any] = {
        **result.meta,
        "specs": list(result.specs),
        "on_grid_threshold_db": ON_GRID_DB,
        "summary": [summary_to_json(s) for s in result.summary],
    }
    if layers:
        out["layers"] = [layer_to_json(r) for r in result.layers]
    return out


def result_to_csv(result: StudyResult) -> str:
    """One CSV row per (layer, spec); empty metric cells for skipped rows, ``inf`` for exact ones."""
    from mixq.eval.study import spec_family
    from mixq.quant import QuantSpec

    families = {s: spec_family(QuantSpec.parse(s)) for s in result.specs}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in result.layers:
        writer.writerow([
            r.layer, "x".join(map(str, r.shape)), r.numel, r.spec, families.get(r.spec, ""),
            _cell(r.bits_per_value), _cell(r.mse), _cell(r.sqnr_db), r.skipped or "",
        ])
    return buf.getvalue()


def _cell(v: float | None) -> str:
    return "" if v is None else repr(v) if math.isfinite(v) else str(v)


def fmt_db(v: float, digits: int = 2) -> str:
    """A dB value for display: ``exact`` for inf, ``-`` for NaN."""
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "exact" if v > 0 else "-inf"
    return f"{v:.{digits}f}"


def summary_table(result: StudyResult, title: str | None = None) -> Table:
    """A rich table of the per-spec summary, sorted by bits per value (largest first)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in (("spec", "left"), ("family", "left"), ("bits/value", "right"),
                         ("SQNR mean dB", "right"), ("median", "right"), ("min", "right"),
                         ("rel. MSE", "right"), ("layers", "right"), ("note", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    rows = sorted(result.summary, key=lambda s: -s.bits_per_value if not math.isnan(s.bits_per_value) else 0)
    for s in rows:
        layers = str(s.layers) + (f" (+{s.layers_skipped} skipped)" if s.layers_skipped else "")
        bpv = "-" if math.isnan(s.bits_per_value) else f"{s.bits_per_value:.3f}"
        rel = "-" if math.isnan(s.rel_mse) else f"{s.rel_mse:.2e}"
        style = "bold yellow" if s.on_grid else None
        table.add_row(s.spec, s.family, bpv, fmt_db(s.sqnr_mean_db), fmt_db(s.sqnr_median_db),
                      fmt_db(s.sqnr_min_db), rel, layers, s.note, style=style)
    return table


def save_study(result: StudyResult, out_dir: Path, plot: bool = True) -> dict[str, Path]:
    """Write ``study.json``, ``study.csv``, ``study.png`` and ``environment.json`` into ``out_dir``;
    returns the paths."""
    from mixq.eval.study_plot import plot_study
    from mixq.run_info import write_environment

    text = json.dumps(result.to_json(), indent=1, allow_nan=False) + "\n"
    paths = {
        "json": atomic_write_text(out_dir / "study.json", text),
        "csv": atomic_write_text(out_dir / "study.csv", result_to_csv(result)),
        "environment": write_environment(out_dir),
    }
    if plot:
        paths["png"] = atomic_write(out_dir / "study.png", lambda tmp: plot_study(result, tmp))
    return paths
