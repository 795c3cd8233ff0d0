"""Step time of each low-precision training recipe relative to fp32, measured in one run.

Protocol (../shared/BENCHMARKS.md: same process, baseline alongside, ratios):

- Model: an MLP of ``--layers`` ``nn.Linear(width, width)`` + GELU blocks (seed 0). Each recipe wraps
  every linear in ``mixq.training.EmulatedLinear`` with that recipe's ``GemmFormats``; ``fp32`` is the
  plain module (no emulation), and ``fp32-emulated`` is the emulation path with every operand in fp32
  (what the wrapper itself costs).
- One step: forward on a ``[--tokens, width]`` random batch, MSE loss to a fixed random target,
  backward, ``torch.optim.SGD`` step. Per repeat, every recipe runs ``--steps`` steps in turn (the
  variants alternate, so load drifts hit all of them); reported: median seconds per step over
  ``--repeats`` and the ratio to fp32's median.

The emulation quantizes six operands per linear in fp32 arithmetic (exact formats, no low-precision
kernel), so it is slower than fp32: the ratio says what an experiment costs, not what hardware would do.

    OMP_NUM_THREADS=2 python benchmarks/training_step.py --threads 2 \
        --json benchmarks/results/training-step.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mixq.training import RECIPES, EmulatedLinear, GemmFormats, recipe


def mlp(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*mods)


def emulated(model: nn.Sequential, formats: GemmFormats) -> nn.Sequential:
    out = copy.deepcopy(model)
    for i, m in enumerate(out):
        if isinstance(m, nn.Linear):
            out[i] = EmulatedLinear(m, formats)
    return out


def step_seconds(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/training-step.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    base = mlp(args.width, args.layers)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.width, generator=g)
    target = torch.randn(args.tokens, args.width, generator=g)
    variants: dict[str, nn.Module] = {"fp32": copy.deepcopy(base),
                                      "fp32-emulated": emulated(base, recipe("fp32"))}
    for name in RECIPES:
        if name != "fp32":
            variants[name] = emulated(base, recipe(name))
    for model in variants.values():  # warm-up
        step_seconds(model, x, target, 1)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, model in variants.items():
            times[name].append(step_seconds(model, x, target, args.steps))
    fp32 = statistics.median(times["fp32"])
    results = {name: {"formats": recipe(name).describe() if name in RECIPES else "plain nn.Linear",
                      "step_s": statistics.median(t), "ratio_to_fp32": statistics.median(t) / fp32,
                      "all_step_s": t} for name, t in times.items()}
    doc = {"protocol": "benchmarks/training_step.py docstring",
           "machine": {"cores": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
                       "uptime_before": load_before,
                       "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()},
           "settings": {k: getattr(args, k) for k in ("width", "layers", "tokens", "steps", "repeats")},
           "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print("| recipe | ms / step | x fp32 |\n|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s'] * 1e3:.1f} | {r['ratio_to_fp32']:.2f} |")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
