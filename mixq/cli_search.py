"""``mixq profile``, ``mixq search`` and ``mixq frontier``: parsing and printing; the work is in
:mod:`mixq.search_pipeline`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path
from typing import Any

from mixq.cli_progress import progress_bar

PROFILE_EXAMPLE = """example:
  mixq profile smollm2 --out runs/profile-smollm2                  # default candidates, weight/fisher/hessian
  mixq profile smollm2 --candidates int4:g64:mse,mxfp4,int8:channel,keep --metrics fisher,kl --validate 24 \\
      --out runs/profile-small"""
SEARCH_EXAMPLE = """example:
  mixq search runs/profile-smollm2 --budget 4.25 --out runs/plan-4.25
  mixq search runs/profile-smollm2 --budget 5 --pin '*.down_proj=int8:channel' --metric hessian --out runs/p5
  mixq quantize smollm2 --plan runs/plan-4.25/plan.yaml --out runs/mixed-4.25   # then apply the plan"""
FRONTIER_EXAMPLE = """example:
  mixq frontier runs/profile-smollm2 --budgets 3.5,4.25,5 --families joint,int,float --out runs/frontier
  mixq frontier runs/profile-smollm2 --budgets 4,4.5,5 --algorithm gptq --measure --eval-windows 8 \
      --out runs/frontier-measured"""


def _common_search(p: argparse.ArgumentParser) -> None:
    """Options shared by ``search`` and ``frontier``."""
    p.add_argument("profile", metavar="PROFILE", type=Path, help="a profile folder (or its profile.json)")
    p.add_argument("--metric", default="fisher", help="score used as predicted degradation (default fisher)")
    p.add_argument("--candidates", default=None, metavar="SUBSET",
                   help="comma-separated subset of the profile's candidates (default: all)")
    p.add_argument("--latency", type=float, default=None, metavar="S", help="total latency budget, seconds")
    p.add_argument("--latency-table", type=Path, default=None, metavar="CSV",
                   help="per layer (name or OUTxIN) and candidate seconds: layer,candidate,seconds")
    p.add_argument("--bops", type=float, default=None, metavar="X", help="total bit-operations budget")
    p.add_argument("--pin", action="append", default=[], metavar="PAT=CAND",
                   help="force layers matching a glob (or re:REGEX) to a candidate; repeatable")
    p.add_argument("--no-tie", action="store_true",
                   help="let layers reading the same input (q/k/v, gate/up) take different candidates")
    p.add_argument("--constraints", type=Path, default=None, metavar="FILE",
                   help="YAML/JSON with budget, pin, tie and latency_table entries")
    p.add_argument("--algorithm", choices=("rtn", "gptq", "awq"), default="gptq",
                   help="algorithm written into the plan (default gptq)")
    p.add_argument("--method", choices=("milp", "greedy", "lagrangian", "brute"), default="milp",
                   help="solver (default milp: exact ILP with HiGHS)")
    p.add_argument("--time-limit", type=float, default=30.0, metavar="S", help="ILP time limit per solve")
    p.add_argument("--model", default=None,
                   help="check that this model's layers are the profile's (frontier: the model to measure)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout (only that)")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``profile``, ``search`` and ``frontier`` on the subcommand parser ``sub``."""
    from mixq.plan import DEFAULT_CANDIDATES

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("profile", parents=[common], help="sensitivity of every layer to every candidate",
                       description="Score every layer x candidate (data-free weight error, Fisher, Hessian "
                                   "trace, measured KL) and save a profile table.", epilog=PROFILE_EXAMPLE,
                       formatter_class=fmt)
    p.add_argument("model", metavar="MODEL", help="smollm2, minilm, or a local Hugging Face model folder")
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                   help="comma-separated candidates: keep | WEIGHT | WEIGHT@INPUT "
                        f"(default: {DEFAULT_CANDIDATES})")
    p.add_argument("--metrics", default="weight,fisher,fisher_model",
                   help="some of weight,fisher,fisher_model,hessian,kl (default: weight,fisher,fisher_model; hessian "
                        "costs about six times a Fisher pass and holds the double-backward graph)")
    p.add_argument("--calib", default="wiki", help="calibration text: wiki, a .txt file or a token file")
    p.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--length", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward/backward pass (default 2)")
    p.add_argument("--keep", default="lm_head", help="comma-separated patterns left out of the search")
    p.add_argument("--validate", type=int, default=0, metavar="N",
                   help="measure KL on N random (layer, candidate) pairs and rank-correlate each metric")
    p.add_argument("--validate-samples", type=int, default=4, metavar="N",
                   help="calibration windows the validation KL is measured on (default 4)")
    p.add_argument("--hutchinson-samples", type=int, default=4, help="Hessian trace probes (default 4)")
    p.add_argument("--seed", type=int, default=0, help="calibration windows and random probes")
    p.add_argument("--out", type=Path, required=True, help="output folder (profile.json, profile.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print the JSON summary on stdout (only that)")

    p = sub.add_parser("search", parents=[common], help="the best plan within a budget, from a profile",
                       description="Choose one candidate per layer minimising the predicted degradation "
                                   "within the budgets (multiple-choice knapsack ILP); writes a plan.",
                       epilog=SEARCH_EXAMPLE, formatter_class=fmt)
    _common_search(p)
    p.add_argument("--layers", action="store_true", help="print every layer's choice (default: per layer role)")
    p.add_argument("--budget", type=float, default=None, metavar="BITS",
                   help="bits per weight over the profiled layers, every scale counted")

    p = sub.add_parser("frontier", parents=[common], help="searched plans over budgets, vs uniform ones",
                       description="Sweep bits/weight budgets per candidate family, add every "
                                   "uniform candidate, optionally quantize and evaluate each plan; "
                                   "writes plots and a report.",
                       epilog=FRONTIER_EXAMPLE, formatter_class=fmt)
    _common_search(p)
    p.add_argument("--budgets", required=True, help="comma-separated bits/weight budgets, e.g. 3.5,4.25,5")
    p.add_argument("--families", default="joint", help="some of joint,int,float (default joint)")
    p.add_argument("--measure", action="store_true", help="quantize and evaluate the plans")
    p.add_argument("--measure-uniform", choices=("all", "budget", "none"), default="budget",
                   help="uniform candidates measured with --measure: all, those within the largest budget "
                        "(default), or none; keep (the unquantized model) is always measured")
    p.add_argument("--eval-windows", type=int, default=32, help="test windows per evaluation (default 32)")
    p.add_argument("--calib", default=None, help="calibration/eval source (default: the profile's)")
    p.add_argument("--samples", type=int, default=64,
                   help="calibration windows per quantization (default 64)")
    p.add_argument("--length", type=int, default=None, help="tokens per window (default: the profile's)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")


def _items(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _pins(items: list[str]) -> dict[str, str]:
    pins = {}
    for item in items:
        pattern, sep, cand = item.rpartition("=")
        if not sep or not pattern.strip() or not cand.strip():
            raise ValueError("expected --pin PATTERN=CANDIDATE (e.g. '*.down_proj=int8:channel'), "
                             f"found {item!r}")
        pins[pattern.strip()] = cand.strip()
    return pins


def _budgets(text: str) -> list[float]:
    try:
        values = [float(t) for t in _items(text) or []]
    except ValueError as err:
        raise ValueError("expected --budgets as comma-separated numbers such as 3.5,4.25,5, "
                         f"found {text!r}") from err
    if not values:
        raise ValueError(f"expected at least one budget in --budgets, found {text!r}")
    return values


def _load_table(args: argparse.Namespace) -> Any:
    from mixq.sensitivity.table import SensitivityTable

    folder = args.profile if args.profile.is_dir() else args.profile.parent
    if args.out.resolve() == folder.resolve():
        raise ValueError(f"refusing to write the output over the profile folder {folder}; "
                         "choose another --out")
    return SensitivityTable.load(args.profile)


def _num(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def cmd_profile(args: argparse.Namespace, consoles: Any, quiet: Any) -> int:
    """``mixq profile``: score layers x candidates, save the table, print a per-candidate summary."""
    from mixq.plan import parse_candidates
    from mixq.search_pipeline import json_safe, profile_model, profile_summary

    cands = parse_candidates(args.candidates)  # candidate errors before loading anything
    out, err = consoles()
    quiet()
    with progress_bar(err, "loading") as bar:
        table = profile_model(args.model, [c.name for c in cands], metrics=_items(args.metrics) or [],
                              calib=args.calib, samples=args.samples, length=args.length,
                              batch_size=args.batch_size,
                              keep=tuple(_items(args.keep) or ()), validate=args.validate,
                              validate_samples=args.validate_samples,
                              hutchinson_samples=args.hutchinson_samples, seed=args.seed, out=args.out,
                              overwrite=args.overwrite, progress=bar.progress, status=bar.status)
    summary = profile_summary(table)
    if args.json:
        print(json.dumps(json_safe({"out": str(args.out), "model": table.model, "layers": len(table.layers),
                                    "candidates": table.candidates, "metrics": list(table.scores),
                                    "summary": summary, "validation": table.validation, "notes": table.notes,
                                    "meta": table.meta}), indent=1, allow_nan=False))
        return 0
    from rich.table import Table

    t = Table(title=f"{table.model}: sensitivity profile, {len(table.layers)} layers "
                    "(median score per layer)")
    cols = ["candidate", "family", "layers", "bits/w", *table.scores, *(f"{m} s" for m in table.scores)]
    for col in cols:
        t.add_column(col, justify="left" if col in ("candidate", "family") else "right")
    for r in summary:
        t.add_row(r["candidate"], r["family"], str(r["layers"]), _num(r["bits_per_weight"]),
                  *(_num(r[m]) for m in table.scores), *(_num(r[f"{m}_s"], 3) for m in table.scores))
    out.print(t)
    if table.validation:
        pairs = len(table.validation.get("pairs", []))
        v = Table(title=f"validation ({pairs} pairs): Spearman rho vs measured "
                        f"{table.validation.get('measured_by')}", min_width=50)
        v.add_column("metric")
        v.add_column("rho", justify="right")
        for metric, rho in table.validation.get("spearman", {}).items():
            v.add_row(metric, _num(rho, 3))
        out.print(v)
    for note in _summarize_notes(table.notes, table.candidates):
        err.print(f"note: {note}")
    err.print(f"wrote {args.out}")
    return 0


def _summarize_notes(notes: list[str], candidates: list[str]) -> list[str]:
    """"C does not fit LAYER ..." notes folded into one line per candidate; other notes as they are."""
    misfits: dict[str, list[str]] = {}
    rest = []
    for note in notes:
        cand = next((c for c in candidates if note.startswith(f"{c} does not fit ")), None)
        if cand is None:
            rest.append(note)
        else:
            misfits.setdefault(cand, []).append(note)
    lines = [f"{c} does not fit {len(ns)} layer(s), scored NaN there (all in profile.json); first: "
             f"{ns[0].removeprefix(c + ' does not fit ')}" if len(ns) > 1 else ns[0]
             for c, ns in misfits.items()]
    return lines + rest


def _allocation_summary(rows: list[dict[str, Any]], title: str) -> Any:
    """A table with one row per layer role (the name without its block prefix, e.g. ``mlp.down_proj``):
    how many of its layers took each candidate."""
    from rich.table import Table

    from mixq.eval.search_report import block_and_role

    by_role: dict[str, dict[str, int]] = {}
    for r in rows:
        _, role = block_and_role(r["name"])
        by_role.setdefault(role, {})
        by_role[role][r["candidate"]] = by_role[role].get(r["candidate"], 0) + 1
    t = Table(title=title + " (--layers for every layer)")
    t.add_column("layer role")
    t.add_column("candidates (layers)")
    for role, counts in by_role.items():
        t.add_row(role, ", ".join(f"{c} x{n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1])))
    return t


def _search_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"metric": args.metric, "candidates": _items(args.candidates), "latency": args.latency,
            "latency_table": args.latency_table, "bops": args.bops, "pins": _pins(args.pin),
            "tie": not args.no_tie, "constraints": args.constraints, "algorithm": args.algorithm,
            "method": args.method, "time_limit": args.time_limit, "out": args.out,
            "overwrite": args.overwrite}


def cmd_search(args: argparse.Namespace, consoles: Any, quiet: Any) -> int:
    """``mixq search``: solve for a plan within the budgets, save it, print the allocation."""
    from mixq.search_pipeline import check_profile_model, search_plan

    kwargs = _search_kwargs(args)
    table = _load_table(args)
    out, err = consoles()
    if args.model is not None:
        quiet()
        with err.status(f"checking {args.model} against the profile"), \
                contextlib.redirect_stderr(io.StringIO()):
            check_profile_model(table, args.model)
    result = search_plan(table, args.budget, **kwargs)
    if args.json:
        print(json.dumps(result.to_json(), indent=1, allow_nan=False))
        return 0
    from rich.table import Table

    if args.layers:
        t = Table(title=f"{table.model}: allocation ({args.metric})")
        for col in ("layer", "candidate", "bits/w", args.metric):
            t.add_column(col, justify="left" if col in ("layer", "candidate") else "right")
        for r in result.rows:
            t.add_row(r["name"], r["candidate"], f"{r['bits_per_weight']:.3f}", _num(r.get(args.metric)))
        out.print(t)
    else:
        out.print(_allocation_summary(result.rows, f"{table.model}: allocation ({args.metric})"))
    counts: dict[str, int] = {}
    for r in result.rows:
        counts[r["candidate"]] = counts.get(r["candidate"], 0) + 1
    s = result.solution
    budget = f" (budget {result.budget:g})" if result.budget is not None else ""
    out.print(f"{result.bits_per_weight:.3f} bits/weight over {len(result.rows)} profiled layers{budget}; "
              f"predicted {args.metric} {result.predicted:.4g}; {s.method}"
              f"{' (optimal)' if s.optimal else ''} in {s.seconds:.2f} s; "
              + ", ".join(f"{n} x{c}" for n, c in counts.items()))
    err.print(f"wrote {args.out}")
    return 0


def cmd_frontier(args: argparse.Namespace, consoles: Any, quiet: Any) -> int:
    """``mixq frontier``: searched plans per budget and family plus uniform points; optional measurement."""
    from mixq.frontier_pipeline import frontier
    from mixq.search_pipeline import check_profile_model

    kwargs = _search_kwargs(args)
    budgets = _budgets(args.budgets)
    table = _load_table(args)
    out, err = consoles()
    quiet()
    with progress_bar(err, "searching") as bar:
        status = bar.status
        if args.model is not None and not args.measure:
            check_profile_model(table, args.model, status=status)
        result = frontier(table, budgets, families=_items(args.families) or [], measure=args.measure,
                          model_name=args.model, eval_windows=args.eval_windows, calib=args.calib,
                          calib_samples=args.samples, length=args.length, batch_size=args.batch_size,
                          measure_uniform=args.measure_uniform,
                          progress=bar.progress, status=status, **kwargs)
    if args.json:
        print(json.dumps(result.to_json(), indent=1, allow_nan=False))
        return 0
    from rich.table import Table

    name = result.measured_name or "measured"
    t = Table(title=f"{result.model}: frontier ({result.metric}, {result.algorithm})")
    for col in ("point", "family", "bits/w", "predicted", name, "quantize s", "eval s", "pareto"):
        t.add_column(col, justify="left" if col in ("point", "family") else "right")
    for p in sorted(result.points, key=lambda p: (p["bits_per_weight"], p["label"])):
        t.add_row(p["label"], p["family"], f"{p['bits_per_weight']:.3f}", _num(p["predicted"]),
                  _num(p["measured"]), _num(p["quantize_s"], 3), _num(p["eval_s"], 3),
                  "*" if p["pareto"] else "")
    out.print(t)
    if result.spearman is not None:
        out.print(f"Spearman rank correlation of predicted and measured {name}: {result.spearman:.3f}")
    for note in result.notes:
        err.print(f"note: {note}")
    err.print(f"wrote {args.out}")
    return 0
