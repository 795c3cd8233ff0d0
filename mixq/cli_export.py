"""``mixq export`` and ``mixq generate``: parsing and printing; the work is in :mod:`mixq.export_pipeline`
and :mod:`mixq.runtime`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from mixq.cli_progress import progress_bar

EXPORT_EXAMPLE = """example:
  mixq export runs/smollm2-int4-gptq --out ckpt/smollm2-int4        # a run folder, compressed-tensors if it can
  mixq export smollm2 --plan runs/search/plan.yaml --format mixq --out ckpt/mixed
  mixq export runs/w8a8 --format compressed-tensors --out ckpt/w8a8 --json"""
GENERATE_EXAMPLE = """example:
  mixq generate ckpt/smollm2-int4 --prompt "The capital of France is" --max-new-tokens 24
  mixq generate ckpt/w8a8 --prompt "Once upon a time" --fake   # the fake-quant model instead"""


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``export`` and ``generate`` on the subcommand parser ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("export", parents=[common], help="write a packed checkpoint that runtimes load",
                       description="Pack a run folder (or a model quantized with a plan) into compressed-tensors "
                                   "(vLLM, SGLang, transformers) or mixq's own format, then reload it and check "
                                   "that its logits are identical to the quantized model's.",
                       epilog=EXPORT_EXAMPLE, formatter_class=fmt)
    p.add_argument("source", metavar="RUN_DIR|MODEL", help="a mixq run folder, or a model with --plan")
    p.add_argument("--plan", type=Path, default=None, help="quantize MODEL with this plan first")
    p.add_argument("--format", choices=("auto", "compressed-tensors", "mixq"), default="auto",
                   help="auto (default): compressed-tensors when it expresses every layer, else mixq")
    p.add_argument("--out", type=Path, required=True, help="folder to write (never the source)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-verify", action="store_true", help="skip reloading and comparing logits")
    p.add_argument("--calib", default="wiki", help="with --plan: calibration text (wiki, .txt or token file)")
    p.add_argument("--samples", type=int, default=64, help="with --plan: calibration windows")
    p.add_argument("--length", type=int, default=512, help="with --plan: tokens per calibration window")
    p.add_argument("--json", action="store_true", help="print the JSON result on stdout (only that)")

    p = sub.add_parser("generate", parents=[common], help="generate text from a packed checkpoint on CPU",
                       description="Load an exported folder (or a run folder), replace the layers the CPU "
                                   "runtime supports by packed modules (int8 W8A8 through torch._int_mm, "
                                   "weight-only integers dequantized per tile) and generate greedily.",
                       epilog=GENERATE_EXAMPLE, formatter_class=fmt)
    p.add_argument("folder", metavar="DIR", help="a mixq export, compressed-tensors checkpoint or run folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--fake", action="store_true", help="run the fake-quant model instead of packed modules")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout (only that)")


def cmd_export(args: argparse.Namespace, consoles: Any, quiet: Any) -> int:
    """``mixq export``: read or quantize, write, verify; print a summary."""
    from mixq.export_pipeline import check_output, export, exported_layers
    from mixq.plan import Plan

    plan = Plan.load(args.plan) if args.plan is not None else None  # plan errors before loading anything
    check_output(args.out, args.source, args.overwrite)  # and output errors before any heavy work
    out, err = consoles()
    quiet()
    with progress_bar(err, "loading") as bar:
        kw = {"calib": args.calib, "samples": args.samples, "length": args.length, "progress": bar.progress}
        src = exported_layers(args.source, plan, quantize_kw=kw, status=bar.status)
        bar.update(description="writing" + ("" if args.no_verify else " and verifying"), total=None)
        outcome = export(src, args.out, format=args.format, overwrite=args.overwrite, verify=not args.no_verify)
    result = outcome.to_json()
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return 0
    out.print(_schemes_table(outcome))
    out.print(f"{outcome.format}: {outcome.layers} layers, {outcome.bytes_on_disk / 2**20:.2f} MiB on disk, "
              f"{result['size_ratio']:.4f} x the bits accounting ({result['payload_ratio']:.4f} without the "
              f"safetensors headers), written in {outcome.seconds:.1f} s")
    if outcome.verified:
        out.print("verified: the reloaded model's logits are identical to the quantized model's")
    if args.format == "auto" and outcome.unsupported:
        first = next(iter(outcome.unsupported.items()))
        err.print(f"mixq format chosen: compressed-tensors cannot express {len(outcome.unsupported)} layers "
                  f"(e.g. {first[0]}: {first[1]})")
    err.print(f"wrote {outcome.out}")
    return 0


def _schemes_table(outcome: Any) -> Any:
    from rich.table import Table

    table = Table(title=f"exported layers ({outcome.format})")
    table.add_column("scheme")
    table.add_column("layers", justify="right")
    for scheme, n in outcome.schemes.items():
        table.add_row(scheme, str(n))
    return table


def cmd_generate(args: argparse.Namespace, consoles: Any, quiet: Any) -> int:
    """``mixq generate``: load, pack, generate; print the text and the speed."""
    import torch

    from mixq.export.load import read
    from mixq.pipeline import load_tokenizer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out, err = consoles()
    quiet()
    exported = read(args.folder)
    tokenizer = load_tokenizer(args.folder)
    packed: dict[str, str] = {}
    if not args.fake:
        from mixq.model.packed import pack_model

        packed = pack_model(exported.model, exported.layers)
    from mixq.runtime.generate import generate

    t0 = time.perf_counter()
    text = generate(exported.model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - t0
    kinds: dict[str, int] = {}
    for kind in packed.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    result = {"prompt": args.prompt, "text": text, "seconds": seconds, "packed_layers": kinds,
              "fake_quant_layers": len(exported.layers) - len(packed)}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    from rich.markup import escape

    out.print(f"[bold]{escape(args.prompt)}[/bold]{escape(text)}", highlight=False)
    err.print(f"{args.max_new_tokens} tokens in {seconds:.2f} s; packed layers: "
              + (", ".join(f"{n} {k}" for k, n in kinds.items()) or "none")
              + f"; fake-quant layers: {result['fake_quant_layers']}")
    return 0
