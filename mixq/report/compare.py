"""``mixq compare``: runs side by side, one row per run with the same columns for every kind.

A value that does not apply to a kind (bits/weight of a training run, a metric of a profile) is None
in JSON and ``-`` in the table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mixq.report.layers import spec_summary
from mixq.report.runs import Run, finite_float, load_run

COLUMNS = ("run", "kind", "model", "plan", "bits_per_weight", "metric", "value", "seconds", "mixq", "torch",
           "commit")


def _best_frontier(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The searched point of least measured (else predicted) degradation among the Pareto points."""
    searched = [p for p in points if p.get("family") != "uniform"]
    key = "measured" if any(p.get("measured") is not None for p in searched) else "predicted"
    ranked = [p for p in searched if finite_float(p.get(key)) is not None]
    return min(ranked, key=lambda p: (finite_float(p[key]), finite_float(p.get("bits_per_weight")) or 0.0)) if ranked else None


def _eval_metric(ev: dict[str, Any] | None) -> tuple[str | None, float | None]:
    if not ev:
        return None, None
    for name in ("ppl", "kl", "cosine", "accuracy"):
        if finite_float(ev.get(name)) is not None:
            return name, finite_float(ev[name])
    return None, None


def run_summary(run: Run) -> dict[str, Any]:
    """One row of :data:`COLUMNS` for ``run`` (values that do not apply are None).

    ``plan``: the specs used (``int4:g32 x12, int8:channel x2``), the training recipe, or what a
    frontier/profile covers; ``metric``/``value``: the run's headline quality figure (perplexity or KL
    of a stored evaluation, a training run's task metric, a frontier's best measured point);
    ``seconds``: the work's wall time as recorded in the folder.
    """
    d, env = run.data, run.environment or {}
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    versions = env.get("versions") or {}
    row.update(run=str(run.path), kind=run.kind, mixq=d.get("mixq_version") or versions.get("mixq"),
               torch=versions.get("torch"), commit=((env.get("git") or {}).get("commit") or "")[:12] or None)
    if run.kind == "quantize":
        report = d.get("report") or {}
        row.update(model=d.get("model") or d.get("source"),
                   plan=spec_summary([str(r.get("spec", "")).split(" ")[0] for r in report.get("layers") or []]),
                   bits_per_weight=finite_float((report.get("bits") or {}).get("quantized_bits_per_weight")),
                   seconds=finite_float(report.get("seconds")))
        row["metric"], row["value"] = _eval_metric(run.extra.get("eval"))
    elif run.kind == "train":
        what = f"QAT {d['qat']}" if d.get("qat") else f"recipe {d.get('recipe')}"
        row.update(model=d.get("task"), plan=f"{what}, {d.get('optimizer')}, {d.get('steps')} steps",
                   metric=d.get("metric"), value=finite_float((d.get("metrics") or {}).get(str(d.get("metric")))),
                   seconds=finite_float(sum(finite_float(s) or 0.0 for s in d.get("step_seconds") or [])))
    elif run.kind == "frontier":
        points = d.get("points") or []
        best = _best_frontier(points)
        row.update(model=d.get("model"), plan=f"{len(points)} points ({', '.join(d.get('families') or [])})",
                   seconds=finite_float(sum((finite_float(p.get("quantize_s")) or 0) + (finite_float(p.get("eval_s")) or 0) +
                                  (finite_float(p.get("solve_s")) or 0) for p in points)))
        if best is not None:
            measured = best.get("measured") is not None
            row.update(plan=f"best {best['label']} of {len(points)} points", bits_per_weight=finite_float(best["bits_per_weight"]),
                       metric=(d.get("measured_name") or "measured") if measured else f"predicted {d.get('metric')}",
                       value=finite_float(best["measured"] if measured else best["predicted"]))
    elif run.kind == "search":
        row.update(plan=spec_summary([str(r.get("candidate")) for r in d.get("layers") or []]),
                   bits_per_weight=finite_float(d.get("bits_per_weight")), metric=f"predicted {d.get('metric')}",
                   value=finite_float(d.get("predicted")), seconds=finite_float(d.get("solve_s")))
    elif run.kind == "profile":
        meta = d.get("meta") or {}
        row.update(model=d.get("model"), plan=f"{len(d.get('candidates') or [])} candidates x "
                                              f"{len(d.get('layers') or [])} layers",
                   seconds=finite_float(meta.get("seconds")))
    elif run.kind == "export":
        meta = d.get("meta") or d
        report = meta.get("report") or {}
        specs = [str(t.get("spec")) for t in (d.get("tensors") or {}).values()] or [
            str(v.get("weights")) for v in (d.get("layers") or {}).values() if isinstance(v, dict)]
        row.update(model=meta.get("model") or d.get("source"), plan=f"{d.get('format')}: {spec_summary(specs)}",
                   bits_per_weight=finite_float((report.get("bits") or {}).get("quantized_bits_per_weight")))
    return row


def compare_runs(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """:func:`run_summary` of each folder in ``paths`` (any kinds, in order); RunError names a bad one."""
    if not paths:
        raise ValueError("expected at least one run folder to compare, found none")
    return [run_summary(load_run(p)) for p in paths]


def compare_table(rows: Sequence[dict[str, Any]]) -> Any:
    """A rich Table of :func:`compare_runs` rows (columns as :data:`COLUMNS`, ``-`` for None)."""
    from rich.table import Table

    table = Table(title=f"{len(rows)} runs")
    for col in COLUMNS:
        table.add_column("bits/weight" if col == "bits_per_weight" else col,
                         justify="right" if col in ("bits_per_weight", "value", "seconds") else "left")
    for r in rows:
        table.add_row(*[_text(r.get(c)) for c in COLUMNS])
    return table


def _text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.5g}"
    return str(v)
