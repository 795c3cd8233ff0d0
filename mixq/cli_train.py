"""``mixq train``: a low-precision (or QAT) training run on a small task; the work is in
:func:`mixq.training.loop.train`."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from mixq.cli_progress import progress_bar

TRAIN_EXAMPLE = """example:
  mixq train --task fashion-mnist --recipe fp8 --optimizer adam --steps 300 --out runs/fmnist-fp8
  mixq train --task wiki-lm --recipe nvfp4 --optimizer eco --steps 100 --out runs/lm-nvfp4-eco
  mixq train --task fashion-mnist --qat int4:g32 --steps 300 --out runs/fmnist-qat-int4
  mixq train --task fashion-mnist --qat int2:channel --qat-init fp32 --pretrain-steps 300 --steps 150 \
      --lr 3e-4 --out runs/fmnist-qat-int2-ft"""


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``train`` on the subcommand parser ``sub``."""
    from mixq.training.loop import OPTIMIZERS
    from mixq.training.recipes import RECIPES
    from mixq.training.tasks import TASKS

    p = sub.add_parser("train", parents=[common], help="train a small model with a low-precision recipe",
                       description="Train a small model (Fashion-MNIST CNN or a tiny wiki LM) with emulated "
                                   "low-precision GEMMs, a grid optimizer or QAT; writes summary.json, "
                                   "curve.csv and curve.png.",
                       epilog=TRAIN_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=list(TASKS), help="what to train")
    p.add_argument("--recipe", default="fp32", choices=list(RECIPES), help="GEMM formats (default fp32)")
    p.add_argument("--optimizer", default="adam", choices=list(OPTIMIZERS),
                   help="adam/sgd: fp32 weights; eco/sr/naive/master: weights on a grid (default adam)")
    p.add_argument("--steps", type=int, required=True, help="training steps")
    p.add_argument("--seed", type=int, default=0, help="model init, batches and rounding seed")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the task's)")
    p.add_argument("--rule", choices=("adam", "sgd"), default="adam", help="update rule of grid optimizers")
    p.add_argument("--weight-format", default=None,
                   help="weight grid of eco/sr/naive/master (default: the recipe's weight format)")
    p.add_argument("--qat", default=None, metavar="SPEC", help="QAT of the weights with SPEC (recipe fp32); "
                   "also trains an fp32 model and quantizes it with SPEC for comparison")
    p.add_argument("--no-ptq-baseline", action="store_true", help="with --qat: skip the PTQ comparison")
    p.add_argument("--scaling", choices=("current", "delayed", "predicted"), default="current",
                   help="scales of the recipe's per-tensor operands: each tensor's own amax (current), a 16-step "
                        "amax history (delayed), or MOSS-style predicted weight scales (predicted)")
    p.add_argument("--qat-init", choices=("scratch", "fp32"), default="scratch",
                   help="with --qat: train from the random init (scratch) or fine-tune an fp32-trained model "
                        "(fp32: trained --pretrain-steps steps first; that model and its PTQ are the baseline)")
    p.add_argument("--pretrain-steps", type=int, default=None, metavar="N",
                   help="with --qat-init fp32: fp32 steps before QAT (default: --steps)")
    p.add_argument("--pretrain-lr", type=float, default=None, help="with --qat-init fp32: fp32 learning rate "
                   "(default: the task's; --lr is then the fine-tuning rate)")
    p.add_argument("--keep", default=None,
                   help="comma-separated layer patterns kept in full precision (default: the task's)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N", help="evaluate every N steps too")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", action="store_true", help="print the summary JSON on stdout (only that)")


def write_outputs(result: Any, out: Path) -> dict[str, Path]:
    """Write ``summary.json``, ``curve.csv``, ``curve.png`` and ``environment.json`` of ``result`` into ``out``
    (atomically)."""
    from mixq.fileio import atomic_folder
    from mixq.run_info import write_environment

    with atomic_folder(out) as tmp:
        (tmp / "summary.json").write_text(json.dumps(result.to_json(), indent=1, allow_nan=True) + "\n",
                                          encoding="utf-8")
        evals = dict(result.evals)
        with open(tmp / "curve.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss", "step_seconds", result.metric])
            for i, (loss, sec) in enumerate(zip(result.losses, result.step_seconds), start=1):
                m = evals.get(i, {}).get(result.metric)
                w.writerow([i, f"{loss:.6g}", f"{sec:.6g}", "" if m is None else f"{m:.6g}"])
        _plot(result, tmp / "curve.png")
        write_environment(tmp)
    return {name: out / name for name in ("summary.json", "curve.csv", "curve.png", "environment.json")}


def _plot(result: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(1, len(result.losses) + 1))
    ax.plot(steps, result.losses, lw=0.6, alpha=0.4, label="train loss")
    k = max(1, len(steps) // 20)
    if len(steps) > k:
        smooth = [sum(result.losses[max(0, i - k + 1):i + 1]) / len(result.losses[max(0, i - k + 1):i + 1])
                  for i in range(len(steps))]
        ax.plot(steps, smooth, lw=1.5, label=f"train loss (mean of {k})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    what = f"QAT {result.qat}" if result.qat else f"recipe {result.recipe}"
    ax.set_title(f"{result.task}: {what}, {result.optimizer}; {result.metric} {result.final:.4g}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def cmd_train(args: argparse.Namespace, consoles: Any, quiet: Any) -> int:
    """``mixq train``: run, write the folder, print a summary."""
    from mixq.model.run_folder import check_target
    from mixq.training.loop import train
    from mixq.training.tasks import get_task

    if args.steps < 1:
        raise ValueError(f"--steps expected a positive number, found {args.steps}")
    check_target(args.out, None, args.overwrite)
    keep = None if args.keep is None else tuple(k.strip() for k in args.keep.split(",") if k.strip())
    out, err = consoles()
    quiet()
    with progress_bar(err, f"loading {args.task}") as bar:
        task = get_task(args.task)
        bar.update(description="training", total=args.steps, completed=0)

        def progress(step: int, steps: int, loss: float) -> None:
            bar.update(completed=step, total=steps, description=f"training (loss {loss:.4f})")

        result = train(task, args.recipe, args.optimizer, args.steps, args.seed, lr=args.lr,
                       weight_format=args.weight_format, rule=args.rule, qat=args.qat,
                       ptq_baseline=not args.no_ptq_baseline, keep=keep, eval_every=args.eval_every,
                       qat_init=args.qat_init, scaling=args.scaling, pretrain_steps=args.pretrain_steps, pretrain_lr=args.pretrain_lr,
                       progress=progress)
        bar.update(description="writing", total=None)
        paths = write_outputs(result, args.out)
    summary = result.to_json()
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("losses", "step_seconds")}
                         | {"outputs": {k: str(v) for k, v in paths.items()}}, indent=1))
        return 0
    med = summary["median_step_seconds"]
    what = f"QAT {result.qat}" if result.qat else f"recipe {result.recipe}"
    out.print(f"{result.task} ({what}, {result.optimizer}, {len(result.losses)} steps, seed {result.seed}): "
              f"{result.metric} {result.final:.4f}; final train loss {summary['final_train_loss']:.4f}; "
              f"{med * 1000:.1f} ms/step; optimizer state {result.optimizer_state_bytes / 1024:.1f} KiB")
    if result.ptq is not None:
        out.print(f"fp32-trained: {result.metric} {result.ptq['fp32'][result.metric]:.4f}; "
                  f"PTQ ({result.qat}, round to nearest): {result.ptq['ptq'][result.metric]:.4f}")
    for note in result.notes:
        err.print(f"note: {note}")
    err.print(f"wrote {args.out}")
    return 0
