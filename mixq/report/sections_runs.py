"""Report sections of ``mixq quantize``, ``mixq train`` and ``mixq export`` folders."""

from __future__ import annotations

import math
from html import escape
from collections import defaultdict
from typing import Any

from mixq.report.layers import allocation_svg, exact_rules, spec_summary
from mixq.report.page import facts, section, table
from mixq.report.runs import Run, finite_float
from mixq.report.svg import PALETTE, Axes, Point, Series, bars, line_plot


def eval_facts(ev: dict[str, Any]) -> str:
    """The scalar entries of an evaluation result (perplexity, KL, top-1 agreement, cosine, ...)."""
    return facts({k: v for k, v in ev.items() if isinstance(v, str | int | float) and not isinstance(v, bool)})


def quantize_sections(run: Run) -> list[str]:
    """Summary and totals, evaluation (when stored), allocation heat map, per-layer losses and table."""
    d = run.data
    report = d.get("report") or {}
    bits = report.get("bits") or {}
    layers = [r for r in report.get("layers") or [] if isinstance(r, dict)]
    specs = [str(r.get("spec")) for r in layers]
    calibration = report.get("calibration") or {}
    summary = facts({"model": d.get("model") or d.get("source"), "plan": spec_summary(specs) or None,
                     "bits/weight (quantized layers)": bits.get("quantized_bits_per_weight"),
                     "bits/weight (all linear layers)": bits.get("bits_per_weight"),
                     "quantized parameters": bits.get("quantized_params"), "parameters": bits.get("params"),
                     "rotation": report.get("rotation") or d.get("rotate"),
                     "calibration": (f"{calibration.get('samples')} samples, shape {calibration.get('shape')}"
                                     if calibration else None),
                     "seconds": report.get("seconds"), "mixq version": d.get("mixq_version")})
    warnings = "".join(f"<li>{escape(str(w))}</li>" for w in report.get("warnings") or [])
    out = [section("Quantize run", summary + (f"<p>Warnings:</p><ul>{warnings}</ul>" if warnings else ""),
                   "summary")]
    ev = run.extra.get("eval")
    if isinstance(ev, dict):
        out.append(section("Evaluation", eval_facts(ev), "eval"))
    cells = [(str(r["name"]), str(r.get("spec", "")).split(" ")[0], finite_float(r.get("bits_per_weight")),
              f"loss {r.get('loss')}") for r in layers if r.get("name")]
    kept = {name for name, cand in exact_rules(run.extra.get("plan") or []) if cand == "keep"}
    cells += [(name, "keep", 16.0, "kept in full precision") for name in sorted(kept)
              if name not in {c[0] for c in cells}]
    if cells:
        out.append(section("Per-layer allocation", allocation_svg(cells, "alloc-0"), "allocation"))
    key = "loss" if any((finite_float(r.get("loss")) or 0) > 0 for r in layers) else "error"
    values = [finite_float(r.get(key)) for r in layers]
    if any(v is not None and v > 0 for v in values):
        names = [str(r.get("name")) for r in layers]
        tips = [f"{n}\n{r.get('spec')}: loss {r.get('loss')}, RTN loss {r.get('rtn_loss')}, error {r.get('error')}"
                for n, r in zip(names, layers)]
        title = "Layer loss (the algorithm's objective)" if key == "loss" else "Layer weight error"
        out.append(section(title, bars(names, [v if v is not None else math.nan for v in values], tips, "loss-bars",
                                       value_label=key, log=True), "losses"))
    headers = ["layer", "spec", "algorithm", "bits/weight", "loss", "RTN loss", "error", "seconds", "notes"]
    rows = [[r.get("name"), r.get("spec"), r.get("algorithm"), r.get("bits_per_weight"), r.get("loss"),
             r.get("rtn_loss"), r.get("error"), r.get("seconds"), "; ".join(map(str, r.get("notes") or []))]
            for r in layers]
    out.append(section("Layers", table(headers, rows), "layers"))
    return out


def train_sections(run: Run) -> list[str]:
    """Summary and final metrics, the training-loss curve, the evaluation curve and the PTQ/QAT baseline."""
    d = run.data
    metric = str(d.get("metric") or "metric")
    what = f"QAT {d['qat']}" if d.get("qat") else f"recipe {d.get('recipe')}"
    summary = facts({"task": d.get("task"), "training": what, "optimizer": d.get("optimizer"),
                     "steps": d.get("steps"), "seed": d.get("seed"), "learning rate": d.get("lr"),
                     "weight format": d.get("weight_format"), "scaling": d.get("scaling"),
                     "QAT init": d.get("qat_init"), "final train loss": d.get("final_train_loss"),
                     "median step seconds": d.get("median_step_seconds"), "parameters": d.get("parameters"),
                     "optimizer state bytes": d.get("optimizer_state_bytes"),
                     **{f"final {k}": v for k, v in (d.get("metrics") or {}).items()}})
    out = [section("Training run", summary, "summary")]
    curve = run.extra.get("curve") or []
    steps = [finite_float(r.get("step")) for r in curve]
    losses = [finite_float(r.get("loss")) for r in curve]
    if not curve:
        losses = [finite_float(v) for v in d.get("losses") or []]
        steps = [float(i + 1) for i in range(len(losses))]
    pts = [Point(s, v, f"step {s:g}: loss {v:.5g}") for s, v in zip(steps, losses) if s is not None and v is not None]
    series = [Series("train loss", pts, "#9ab8d8")]
    k = max(1, len(pts) // 20)
    if len(pts) > k > 1:
        smooth = [sum(p.y for p in pts[max(0, i - k + 1):i + 1]) / len(pts[max(0, i - k + 1):i + 1])
                  for i in range(len(pts))]
        series.append(Series(f"train loss (mean of {k})", [Point(p.x, y, f"step {p.x:g}: mean loss {y:.5g}")
                                                           for p, y in zip(pts, smooth)], PALETTE[0]))
    out.append(section("Training curve", line_plot(series, Axes("step", "loss"), "train-plot"), "curve"))
    evals = [e for e in d.get("evals") or [] if isinstance(e, dict)]
    eval_pts = [Point(float(e["step"]), v, f"step {e['step']}: {metric} {v:.5g}") for e in evals
                if finite_float(e.get("step")) is not None and (v := finite_float(e.get(metric))) is not None]
    if eval_pts:
        out.append(section(f"Evaluation ({metric})", line_plot([Series(metric, eval_pts, PALETTE[1])],
                                                               Axes("step", metric), "eval-plot"), "evals"))
    ptq = d.get("ptq")
    if isinstance(ptq, dict):
        names = {"fp32": "fp32-trained model", "ptq": f"fp32-trained, PTQ {d.get('qat') or ''} (round to nearest)",
                 "fp32_continued": "fp32-trained, continued"}
        keys = sorted({k for v in ptq.values() if isinstance(v, dict) for k in v} | set(d.get("metrics") or {}))
        rows = [[names.get(k, k), *[v.get(m) for m in keys]] for k, v in ptq.items() if isinstance(v, dict)]
        rows.append([f"this run ({what})", *[(d.get("metrics") or {}).get(m) for m in keys]])
        out.append(section("Baselines (PTQ vs QAT)", table(["model", *keys], rows), "baselines"))
    emulated = d.get("emulated_layers") or {}
    if emulated:
        out.append(section("Emulated layers", table(["layer", "formats"], sorted(emulated.items())), "emulated"))
    return out


def _layer_bytes(tensor_bytes: dict[str, int], layer: str) -> int:
    return sum(b for name, b in tensor_bytes.items() if name.startswith(layer + "."))


def export_sections(run: Run) -> list[str]:
    """Summary (format, files, bytes), sizes per layer and per storage format, and the layer table."""
    d = run.data
    tensor_bytes: dict[str, int] = run.extra.get("tensor_bytes") or {}
    files = d.get("files") or {}
    report_layers = {str(r.get("name")): r for r in (d.get("report") or (d.get("meta") or {}).get("report") or {})
                     .get("layers") or [] if isinstance(r, dict)}
    rows: list[list[Any]] = []
    if isinstance(d.get("tensors"), dict):  # mixq manifest: tensors with spec, shape and packed parts
        for name, t in d["tensors"].items():
            layer = name.rsplit(".", 1)[0]
            parts = t.get("parts") or {}
            size = sum(int(p.get("bytes") or 0) for p in parts.values())
            params = math.prod(int(s) for s in t.get("shape") or [0])
            storage = ", ".join(f"{k} {p.get('scheme')}" for k, p in parts.items())
            rows.append([layer, t.get("spec"), storage, size, 8 * size / params if params else None])
    elif isinstance(d.get("layers"), dict):  # compressed-tensors written by mixq
        for layer, info in d["layers"].items():
            size = _layer_bytes(tensor_bytes, layer)
            bpw = (report_layers.get(layer) or {}).get("bits_per_weight")
            rows.append([layer, info.get("weights"), info.get("format"), size, bpw])
    else:  # a compressed-tensors checkpoint from elsewhere: the config's groups
        groups = ((d.get("quantization_config") or {}).get("config_groups") or {})
        for group in groups.values():
            w = group.get("weights") or {}
            spec = f"{w.get('type')}{w.get('num_bits')} {w.get('strategy')}" + (
                f" {w.get('group_size')}" if w.get("group_size") else "")
            for layer in group.get("targets") or []:
                rows.append([layer, spec, group.get("format"), _layer_bytes(tensor_bytes, layer), None])
    total = sum(int(f.get("bytes") or 0) for f in files.values() if isinstance(f, dict)) or None
    summary = facts({"format": d.get("format"), "source": d.get("source"), "mixq version": d.get("mixq_version"),
                     "layers": len(rows), "plan": spec_summary([str(r[1]) for r in rows]) or None,
                     "bytes in files": total, "bytes in safetensors tensors": sum(tensor_bytes.values()) or None,
                     "quantized layer bytes": sum(int(r[3] or 0) for r in rows) or None})
    out = [section("Export", summary, "summary")]
    if files:
        out.append(section("Files", table(["file", "bytes", "sha256"],
                                          [[k, f.get("bytes"), f.get("sha256")] for k, f in files.items()
                                           if isinstance(f, dict)]), "files"))
    if rows:
        by_format: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in rows:
            by_format[f"{r[1]} / {r[2]}"][0] += 1
            by_format[f"{r[1]} / {r[2]}"][1] += int(r[3] or 0)
        out.append(section("Sizes per format", table(["spec / storage", "layers", "bytes"],
                                                      [[k, n, b] for k, (n, b) in by_format.items()]), "formats"))
        out.append(section("Bytes per layer", bars([str(r[0]) for r in rows], [float(r[3] or 0) for r in rows],
                                                   [f"{r[0]}\n{r[1]} ({r[2]}): {r[3]} bytes" for r in rows],
                                                   "bytes-bars", value_label="bytes"), "bytes"))
        out.append(section("Layers", table(["layer", "spec", "storage", "bytes", "bits/weight"], rows), "layers"))
    return out
