"""``mixq quantize`` and ``mixq eval``: parsing and printing; the work is in :mod:`mixq.pipeline`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mixq.cli_progress import progress_bar

QUANTIZE_EXAMPLE = """example:
  mixq quantize smollm2 --spec int4:g64 --algorithm gptq --out runs/smollm2-int4-gptq
  mixq quantize smollm2 --spec int8:channel --inputs int8:token --smooth 0.5 --out runs/w8a8
  mixq quantize smollm2 --spec mxfp4 --hadamard auto --algorithm gptq --out runs/mxfp4-had
  mixq quantize smollm2 --plan plan.yaml --out runs/mixed"""
EVAL_EXAMPLE = """example:
  mixq eval smollm2                      # fp32 perplexity on the wiki-smollm2 protocol
  mixq eval runs/smollm2-int4-gptq --json # perplexity, KL and top-1 agreement to the source model"""


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``quantize`` and ``eval`` on the subcommand parser ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("quantize", parents=[common], help="quantize a model with a plan or one spec",
                       description="Quantize a model (RTN, GPTQ or AWQ; optional rotations, activation and "
                                   "KV-cache quantization) and save a run folder.",
                       epilog=QUANTIZE_EXAMPLE, formatter_class=fmt)
    p.add_argument("model", metavar="MODEL", help="smollm2, minilm, or a local Hugging Face model folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--plan", type=Path, help="a plan file (YAML or JSON)")
    which.add_argument("--spec", help="weight spec for every layer, e.g. int4:g64, mxfp4, nvfp4")
    which.add_argument("--kv-only", action="store_true", help="no weight quantization (with --kv/--inputs)")
    p.add_argument("--algorithm", choices=("rtn", "gptq", "awq"), default="rtn", help="weight algorithm")
    p.add_argument("--inputs", help="input (activation) spec of every linear, e.g. int8:token, fp8_e4m3:token")
    p.add_argument("--static-inputs", action="store_true", help="calibrate one per-tensor input scale")
    p.add_argument("--kv", help="KV-cache spec, e.g. int8:token, fp8_e4m3:g64 (per token and head)")
    p.add_argument("--smooth", type=float, default=None, metavar="ALPHA", help="SmoothQuant with strength ALPHA")
    p.add_argument("--hadamard", default=None, metavar="B|auto",
                   help="online block Hadamard on linear inputs (auto: the spec's block/group size)")
    p.add_argument("--hadamard-seed", type=int, default=None, help="random signs for the online Hadamard")
    p.add_argument("--rotate", choices=("hadamard", "random"), default=None,
                   help="offline rotation of the residual stream, folded into the weights")
    p.add_argument("--rotate-seed", type=int, default=None, help="random signs / matrix of --rotate")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    p.add_argument("--static-groups", action="store_true",
                   help="GPTQ: group scales from the original weights up front (llm-compressor's default)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening (fraction of mean diag H)")
    p.add_argument("--bias-correction", action="store_true", help="fold the mean output error into biases")
    p.add_argument("--salient", type=float, default=0.0, metavar="FRACTION",
                   help="keep this fraction of output rows per layer in 16 bits")
    p.add_argument("--keep", default="lm_head", help="comma-separated patterns kept in full precision")
    p.add_argument("--calib", default="wiki", help="calibration text: wiki, a .txt file or a token file")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--length", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    p.add_argument("--out", type=Path, default=None, help="run folder to write (not written if omitted)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--stream", action="store_true",
                   help="read, quantize and write the weights block by block (needs --out)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of a streamed run, e.g. 300M or 2G (implies --stream)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted streamed run from OUT.partial (implies --stream)")
    p.add_argument("--eval", action="store_true", help="also measure perplexity/KL afterwards")
    p.add_argument("--kl-windows", type=int, default=None, metavar="N",
                   help="with --eval: KL/top-1 on the first N test windows (default: all)")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout (only that)")

    p = sub.add_parser("eval", parents=[common], help="perplexity, KL and agreement of a model or run folder",
                       description="Evaluate a model or a mixq run folder on the wiki-smollm2 protocol "
                                   "(or any text/token file).", epilog=EVAL_EXAMPLE, formatter_class=fmt)
    p.add_argument("model", metavar="MODEL_OR_DIR", help="smollm2, minilm, a model folder or a run folder")
    p.add_argument("--data", default="wiki", help="wiki, a .txt file or a token file (.pt/.npy/.json)")
    p.add_argument("--windows", type=int, default=32, help="test windows (default 32)")
    p.add_argument("--length", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--reference", default=None, help="reference model for KL/agreement (default: the source)")
    p.add_argument("--no-reference", action="store_true", help="perplexity only")
    p.add_argument("--kl-windows", type=int, default=None, metavar="N",
                   help="KL/top-1 on the first N test windows (default: all)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder to save eval.json in (a run folder gains the file; created if missing)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout (only that)")


def build_plan(args: argparse.Namespace) -> Any:
    """The plan of a ``quantize`` command: ``--plan`` as it is, or one uniform rule from the options."""
    from mixq.plan import LayerSpec, Options, Plan
    from mixq.quant import QuantSpec

    if args.plan is not None:
        return Plan.load(args.plan)
    hadamard = 0
    if args.hadamard is not None:
        hadamard = -1 if args.hadamard == "auto" else int(args.hadamard)
    options = Options(act_order=args.act_order, static_groups=args.static_groups, damp=args.damp, smooth_alpha=args.smooth, hadamard=hadamard,
                      hadamard_seed=args.hadamard_seed, bias_correction=args.bias_correction,
                      salient=args.salient)
    spec = LayerSpec(
        weights=QuantSpec.parse(args.spec) if args.spec else None,
        inputs=QuantSpec.parse(args.inputs) if args.inputs else None,
        static_inputs=args.static_inputs,
        kv=QuantSpec.parse(args.kv) if args.kv else None,
        algorithm=args.algorithm if args.spec else "rtn",
        options=options,
    )
    keep = tuple(p.strip() for p in args.keep.split(",") if p.strip())
    return Plan.uniform(spec, keep=keep)


def cmd_quantize(args: argparse.Namespace, consoles: Any, quiet: Any) -> int:
    """``mixq quantize``: build the plan, quantize, save, optionally evaluate; print a summary."""
    from mixq.pipeline import evaluate, quantize

    plan = build_plan(args)  # spec and plan errors before loading anything
    out, err = consoles()
    quiet()
    with progress_bar(err, "loading") as bar:
        streamed = args.stream or args.max_memory is not None or args.resume
        if streamed:
            from mixq.streaming import quantize_streamed_args

            outcome = quantize_streamed_args(args, plan, progress=bar.progress, status=bar.status)
        else:
            outcome = quantize(args.model, plan, calib=args.calib, samples=args.samples, length=args.length,
                               batch_size=args.batch_size, rotate=args.rotate, rotate_seed=args.rotate_seed,
                               out=args.out, overwrite=args.overwrite, progress=bar.progress,
                               status=bar.status)
        evaluation = None
        if args.eval:
            bar.update(description="evaluating", completed=0, total=None)
            evaluation = evaluate(args.out or args.model, model=None if streamed else outcome.model,
                                  reference=args.model, agreement_windows=args.kl_windows,
                                  progress=lambda d, t: bar.update(completed=d, total=t))
    result = outcome.to_json()
    if evaluation is not None:
        result["eval"] = evaluation.to_json()
        if args.out is not None and Path(args.out).is_dir():
            save_evaluation(evaluation, Path(args.out))
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return 0
    out.print(_layer_table(outcome.report))
    bits = outcome.report.bits
    line = (f"{bits['quantized_bits_per_weight']:.3f} bits/weight over quantized layers "
            f"({bits['bits_per_weight']:.3f} over all linear layers, kept ones at 16); "
            f"quantized in {outcome.report.seconds:.1f} s, peak RSS {outcome.peak_rss_mb:.0f} MiB")
    out.print(line)
    for w in outcome.report.warnings:
        err.print(f"warning: {w}")
    if evaluation is not None:
        out.print(_eval_line(evaluation))
    if outcome.out is not None:
        err.print(f"wrote {outcome.out}")
    return 0


def _layer_table(report: Any) -> Any:
    from rich.table import Table

    table = Table(title="quantized layers")
    for col in ("layer", "spec", "algorithm", "bits/w", "loss", "RTN loss", "s", "notes"):
        table.add_column(col, justify="right" if col in ("bits/w", "loss", "RTN loss", "s") else "left")
    for r in report.layers:
        table.add_row(r.name, r.spec, r.algorithm, f"{r.bits_per_weight:.3f}", _num(r.loss), _num(r.rtn_loss),
                      f"{r.seconds:.2f}", "; ".join(r.notes)[:60])
    return table


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _eval_line(e: Any) -> str:
    parts = [f"{e.model} on {e.data}:"]
    if e.ppl is not None:
        parts.append(f"perplexity {e.ppl:.3f} ({e.tokens} tokens)")
    if e.kl is not None:
        parts.append(f"KL {e.kl:.4f}, top-1 agreement {e.top1:.4f} vs {e.reference} ({e.kl_tokens} tokens)")
    if e.cosine is not None:
        parts.append(f"embedding cosine {e.cosine:.5f}, rel. MSE {e.rel_mse:.3g} vs {e.reference}")
    return " ".join(parts)


def cmd_eval(args: argparse.Namespace, consoles: Any, quiet: Any) -> int:
    """``mixq eval``: perplexity and agreement of a model or run folder."""
    from mixq.pipeline import evaluate

    out, err = consoles()
    quiet()
    with progress_bar(err, "evaluating") as bar:
        result = evaluate(args.model, data=args.data, windows=args.windows, length=args.length,
                          reference=args.reference, compare=not args.no_reference,
                          agreement_windows=args.kl_windows,
                          progress=lambda d, t: bar.update(completed=d, total=t))
    if args.out is not None:
        save_evaluation(result, args.out)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
        return 0
    out.print(_eval_line(result) + f" [{result.seconds:.1f} s]")
    if args.out is not None:
        err.print(f"wrote {args.out / EVAL_FILE}")
    return 0


EVAL_FILE = "eval.json"


def save_evaluation(evaluation: Any, folder: Path) -> Path:
    """Write ``evaluation.to_json()`` as ``folder/eval.json`` (atomically; the folder is created if
    needed, a run folder gains the file) and the environment next to it; returns the file's path."""
    from mixq.fileio import atomic_write_text
    from mixq.run_info import ENVIRONMENT, write_environment

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / ENVIRONMENT).is_file():
        write_environment(folder)
    return atomic_write_text(folder / EVAL_FILE, json.dumps(evaluation.to_json(), indent=1) + "\n")
