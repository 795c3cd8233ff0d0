"""The ``mixq`` command line: argument parsing, progress and printing; the work is done elsewhere.

Errors print one line ``error: ...`` on stderr (``--debug`` shows the traceback instead) and exit with
a status scripts can rely on:

====  =====================================================================================
0     success
1     internal error (a bug in mixq: the line says so and how to get the traceback)
2     bad input: a spec, plan, option, config, model path or output folder (the line says what
      was expected, what was found and what to do)
3     environment: an optional package that is not installed (the line names the install command)
4     out of memory
130   interrupted (Ctrl-C)
====  =====================================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mixq
from mixq import cli_export, cli_ptq, cli_report, cli_search, cli_train

DEFAULT_SPECS = ("int8:channel,mxint8,fp8_e4m3:channel,mxfp8_e4m3,mxfp6_e3m2,int4:g32,mxfp4,nvfp4,nvint4,"
                 "nf4:g64")


class UserError(Exception):
    """An error caused by the command's input; reported in one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mixq`` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of errors")
    common.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="read options from a YAML file (keys as the flags, without dashes)")
    common.add_argument("--set", metavar="KEY=VALUE", action="append", default=argparse.SUPPRESS,
                        help="override one config option (repeatable); flags typed here win over both")
    parser = argparse.ArgumentParser(prog="mixq", parents=[common],
                                     description="Mixed-precision quantization of PyTorch models.")
    parser.add_argument("--version", action="version", version=f"mixq {mixq.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("formats", parents=[common], help="list every named number format",
                       description="List every named number format with its bits, range and values.",
                       epilog="example:\n  mixq formats\n  mixq formats --json | python -c "
                              "\"import json,sys; print([f['name'] for f in json.load(sys.stdin)])\"",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    p = sub.add_parser("study", parents=[common], help="weight error of many quantizer specs, per layer",
                       description="Round-to-nearest weight error (MSE, SQNR) of each spec on every "
                                   "linear-like layer, with honest bits per value.",
                       epilog="example:\n  mixq study smollm2 --specs int4:g64,mxfp4,nvfp4,fp8_e4m3:channel "
                              "--out runs/study-smollm2",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="minilm, smollm2, or a local Hugging Face model folder")
    p.add_argument("--specs", default=DEFAULT_SPECS,
                   help=f"comma-separated quantizer specs (default: {DEFAULT_SPECS})")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder for study.json/.csv/.png (default: runs/study-<model>)")
    p.add_argument("--json", action="store_true", help="print the JSON summary on stdout (only that)")
    p.add_argument("--include-embeddings", action="store_true", help="also study embedding tables")
    p.add_argument("--limit-layers", type=int, default=None, metavar="N",
                   help="study the first N layers only")
    cli_ptq.add_parsers(sub, common)
    cli_search.add_parsers(sub, common)
    cli_export.add_parsers(sub, common)
    cli_train.add_parsers(sub, common)
    cli_report.add_parsers(sub, common)
    return parser


def _consoles() -> tuple[Any, Any]:
    """Rich consoles for results (stdout) and progress (stderr), bound to the streams of now."""
    from rich.console import Console

    out = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    return out, Console(file=sys.stderr, width=None if sys.stderr.isatty() else 120)


def cmd_formats(args: argparse.Namespace) -> int:
    """``mixq formats``: the format table, or a JSON list."""
    from mixq.eval.formats_table import all_formats, formats_table

    infos = all_formats()
    if args.json:
        print(json.dumps([f.to_json() for f in infos], indent=1))
        return 0
    out, _ = _consoles()
    out.print(formats_table(infos))
    out.print("bits/value of block formats include the block scale; a tensor scale adds its bits once "
              "per tensor.")
    return 0


def parse_specs(text: str) -> list[mixq.QuantSpec]:
    """Parse a comma-separated spec list (raises on the first bad spec, naming it)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"--specs expected a comma-separated list such as 'int4:g32,mxfp4', found {text!r}")
    specs = []
    for item in items:
        try:
            specs.append(mixq.QuantSpec.parse(item))
        except ValueError as err:  # SpecError, UnknownFormatError, or a format's own check
            message = " ".join(str(err).split())
            raise UserError(message if item in message else f"spec {item!r}: {message}") from err
    return specs


def cmd_study(args: argparse.Namespace) -> int:
    """``mixq study``: load a model, measure every spec on every layer, print and save the results."""
    from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from mixq.eval import study
    from mixq.model import linear_weights, load_model

    specs = parse_specs(args.specs)  # fail on a bad spec before loading anything
    if args.limit_layers is not None and args.limit_layers < 1:
        raise UserError(f"--limit-layers expected a positive number, found {args.limit_layers}")
    out, err = _consoles()
    out_dir = args.out or Path("runs") / f"study-{_slug(args.model)}"
    _quiet_transformers()
    t0 = time.perf_counter()
    # transformers' own tqdm bars (GGUF conversion) would garble the spinner: they write to the
    # sys.stderr of the moment, which is a buffer here, while the rich console keeps the real one.
    with err.status(f"loading {args.model}") as status, contextlib.redirect_stderr(io.StringIO()):
        model = load_model(args.model, status=lambda msg: status.update(msg))
    weights = list(linear_weights(model, include_embeddings=args.include_embeddings))
    if args.limit_layers is not None:
        weights = weights[: args.limit_layers]
    if not weights:
        raise UserError(f"expected linear-like layers in {args.model}, found none")
    load_s = time.perf_counter() - t0
    numel = sum(w.numel() for _, w in weights)
    err.print(f"{args.model}: {len(weights)} layers, {numel / 1e6:.1f} M weights, loaded in {load_s:.1f} s; "
              f"{len(specs)} specs")
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    t1 = time.perf_counter()
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("study", total=float(numel * len(specs)))

        def progress(done: float, total: float | None, message: str) -> None:
            bar.update(task, completed=done, description=message[-60:])

        result = study(weights, specs, progress=progress)
    result.meta.update(model=args.model, mixq_version=mixq.__version__, layers=len(weights), values=numel,
                       load_seconds=round(load_s, 2), study_seconds=round(time.perf_counter() - t1, 2))
    paths = result.save(out_dir)
    if args.json:
        print(json.dumps({**result.to_json(layers=False), "outputs": {k: str(v) for k, v in paths.items()}},
                         indent=1, allow_nan=False))
        return 0
    out.print(result.table(title=f"{args.model}: weight SQNR per spec (RTN), {len(weights)} layers"))
    written = ", ".join(str(p) for p in paths.values())
    err.print(f"study {result.meta['study_seconds']:.1f} s; wrote {written}")
    return 0


def _slug(model: str) -> str:
    name = Path(model).name or model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _quiet_transformers() -> None:
    """The CLI shows its own progress: silence transformers' bars and warnings, keep it offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


COMMANDS = {
    "formats": cmd_formats,
    "study": cmd_study,
    "quantize": lambda args: cli_ptq.cmd_quantize(args, _consoles, _quiet_transformers),
    "eval": lambda args: cli_ptq.cmd_eval(args, _consoles, _quiet_transformers),
    "profile": lambda args: cli_search.cmd_profile(args, _consoles, _quiet_transformers),
    "search": lambda args: cli_search.cmd_search(args, _consoles, _quiet_transformers),
    "frontier": lambda args: cli_search.cmd_frontier(args, _consoles, _quiet_transformers),
    "export": lambda args: cli_export.cmd_export(args, _consoles, _quiet_transformers),
    "generate": lambda args: cli_export.cmd_generate(args, _consoles, _quiet_transformers),
    "train": lambda args: cli_train.cmd_train(args, _consoles, _quiet_transformers),
    "report": lambda args: cli_report.cmd_report(args, _consoles),
    "compare": lambda args: cli_report.cmd_compare(args, _consoles),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mixq`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from mixq.cli_config import ConfigError, expand_argv, save_config

    parser = build_parser()
    try:
        expanded = expand_argv(list(sys.argv[1:] if argv is None else argv), parser)
    except ConfigError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(expanded)
    except SystemExit as exit_:  # argparse: --help, --version, usage errors (status 2)
        return int(exit_.code or 0)
    debug = getattr(args, "debug", False)
    try:
        from mixq.dist.comm import quiet_unless_main

        with quiet_unless_main():  # under torchrun only rank 0 prints
            status = COMMANDS[args.command](args)
        if status == 0:
            save_config(args)
        return status
    except (UserError, ValueError, FileNotFoundError, KeyError) as error:
        return _fail(error, EXIT_USER, debug)
    except ImportError as error:
        missing = getattr(error, "name", None) or "a package"
        hint = OPTIONAL_PACKAGES.get(str(missing).split(".")[0], f"pip install {missing}")
        return _fail(error, EXIT_ENVIRONMENT, debug,
                     f"this needs the optional package {missing!r}, which is not installed: {hint}")
    except MemoryError as error:
        return _fail(error, EXIT_MEMORY, debug, "out of memory: lower --samples, --length or --batch-size, "
                     "or quantize with --max-memory (streamed, one block at a time)")
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: one line unless --debug, and how to get the traceback
        return _fail(error, EXIT_INTERNAL, debug, f"internal error ({type(error).__name__}: "
                     f"{' '.join(str(error).split())}); rerun with --debug for the traceback and report it")


EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_ENVIRONMENT, EXIT_MEMORY = 0, 1, 2, 3, 4
OPTIONAL_PACKAGES = {
    "compressed_tensors": "pip install 'mixq[export]' (compressed-tensors)",
    "numba": "pip install 'mixq[fast]' (numba); without it the exact torch reference runs",
    "matplotlib": "pip install matplotlib",
    "gguf": "pip install gguf",
}


def _fail(error: BaseException, status: int, debug: bool, message: str | None = None) -> int:
    """Print ``error: ...`` in one line (or re-raise with ``--debug``) and return ``status``."""
    if debug:
        raise error
    raw = error.args[0] if isinstance(error, KeyError) and error.args else error  # KeyError quotes its text
    text = message or " ".join(str(raw).split()) or type(error).__name__
    print(f"error: {text}", file=sys.stderr)
    return status
