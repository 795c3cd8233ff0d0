"""Bias of the emulated NVFP4 weight gradient: stochastic rounding and random Hadamard, on the wiki LM.

What the nvfp4 recipe's stochastic rounding (SR) of dY and random Hadamard transform (RHT) of the
wgrad operands are for: a gradient that is right *on average*. Round to nearest on 4-bit blocks has a
systematic error that does not average out over steps; SR's error does. This script measures it on
the real training model (the ``wiki-lm`` task's Llama, fp32-trained ``--warmup`` steps with seed 0, one
held-fixed batch):

- reference ``g``: the gradient of the nvfp4-forward model (X in 1x16 blocks, W in 16x16 blocks) with
  every backward operand in fp32 (dY, and the wgrad's X, unquantized);
- each variant quantizes the backward as the nvfp4 recipe does (dY and the wgrad operands in NVFP4),
  with or without SR on dY and with or without the order-16 RHT (and once with the wgrad's X left in
  fp32, to attribute what remains to X's round to nearest); draw ``k`` uses emulation seed ``k``
  (SR draws and Hadamard signs), ``k = 0 .. draws-1``;
- reported over the weights of every emulated linear (``lm_head`` stays fp32, as in training):
  ``per_draw_error`` = mean over draws of ``||g_k - g|| / ||g||``, ``bias`` = ``||mean_k g_k - g|| / ||g||``
  (for an unbiased estimator it falls like ``per_draw_error / sqrt(draws)``; for a biased one it stays),
  and the cosine of ``mean_k g_k`` with ``g``.

    OMP_NUM_THREADS=1 python benchmarks/gradient_bias.py --draws 32 --json benchmarks/results/gradient-bias.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from mixq.model.emulate_swap import emulate, emulated_layers
from mixq.training import recipe
from mixq.training.loop import make_optimizer
from mixq.training.tasks import get_task

VARIANTS = {  # name -> (stochastic rounding on dY, Hadamard order on the wgrad operands, X^T quantized)
    "nearest, no RHT": (False, 0, True),
    "SR, no RHT": (True, 0, True),
    "nearest, RHT-16": (False, 16, True),
    "SR + RHT-16 (recipe)": (True, 16, True),
    "SR + RHT-16, wgrad X in fp32": (True, 16, False),
}


def variant_formats(sr: bool, hadamard: int, quantize_x: bool):
    dy = "nvfp4:sr" if sr else "nvfp4"
    return recipe("nvfp4").with_(grad_output=dy, wgrad_grad_output=dy, hadamard_wgrad=hadamard,
                                 **({} if quantize_x else {"wgrad_input": None}))


def gradient(model: nn.Module, task, batch: Tensor, formats, seed: int) -> Tensor:
    """All emulated linears' weight gradients, flattened and concatenated ([P] fp32)."""
    m = copy.deepcopy(model)
    emulate(m, formats, [(p, None) for p in task.keep], seed=seed)
    m.train()
    m.zero_grad(set_to_none=True)
    task.loss(m, batch).backward()
    layers = emulated_layers(m)
    return torch.cat([layers[n].weight.grad.detach().reshape(-1) for n in sorted(layers)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draws", type=int, default=32)
    p.add_argument("--warmup", type=int, default=50, help="fp32 Adam steps before measuring")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    task = get_task("wiki-lm")
    model = task.build_model(0)
    opt, _ = make_optimizer(model, "adam", task.lr["adam"])
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.warmup):
        loss = task.loss(model, task.batch(gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    batch = task.batch(gen)
    reference = recipe("nvfp4").with_(grad_output=None, wgrad_grad_output=None, wgrad_input=None,
                                      hadamard_wgrad=0)
    g = gradient(model, task, batch, reference, 0)
    norm = float(g.norm())
    rows = []
    for name, (sr, had, quantize_x) in VARIANTS.items():
        total = torch.zeros_like(g)
        errors = []
        for k in range(args.draws):
            gk = gradient(model, task, batch, variant_formats(sr, had, quantize_x), k)
            total += gk
            errors.append(float((gk - g).norm()) / norm)
        mean = total / args.draws
        row = {"variant": name, "stochastic_rounding": sr, "hadamard": had, "wgrad_x_quantized": quantize_x,
               "draws": args.draws,
               "per_draw_error": sum(errors) / len(errors), "bias": float((mean - g).norm()) / norm,
               "cosine_of_mean": float(torch.nn.functional.cosine_similarity(mean.double(), g.double(), dim=0))}
        row["bias_if_unbiased"] = row["per_draw_error"] / math.sqrt(args.draws)
        rows.append(row)
        print(f"{name:22s} per-draw error {row['per_draw_error']:.4f}  bias {row['bias']:.4f} "
              f"(unbiased would give ~{row['bias_if_unbiased']:.4f})  cos(mean, g) {row['cosine_of_mean']:.5f}",
              flush=True)
    out = {"protocol": __doc__.split("\n\n")[1], "task": "wiki-lm", "warmup_steps": args.warmup,
           "parameters": int(g.numel()), "gradient_norm": norm, "rows": rows,
           "command": f"python benchmarks/gradient_bias.py --draws {args.draws} --warmup {args.warmup}",
           "wall_seconds": time.perf_counter() - t0, "torch_threads": 1}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
