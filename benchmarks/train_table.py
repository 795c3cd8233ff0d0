"""Low-precision training table: recipes, QAT vs PTQ, nvfp4 ablation and grid optimizers.

Runs a named set of rows through :func:`mixq.training.loop.train`, each row in its own process
(``--jobs`` at a time, each with one torch thread and ``OMP_NUM_THREADS=1``), every row with the same
seed, and writes

* ``benchmarks/results/train-table.json`` (every row's ``TrainResult.to_json()`` plus its settings),
* ``benchmarks/results/train-table.md`` (the table, grouped by comparison),
* ``docs/img/train-fashion-mnist.png`` and ``docs/img/train-wiki-lm.png`` (training-loss curves).

Groups (row names in brackets):

1. ``fmnist-recipe``: Fashion-MNIST CNN, fp32 vs the fp8 recipe [fm-fp32, fm-fp8].
2. ``fmnist-qat``: 4-bit and 2-bit weights, PTQ of the fp32-trained model (``train``'s ptq baseline,
   round to nearest) vs QAT with the same spec [fm-qat-int4, fm-qat-int2].
3. ``lm-recipe``: byte-level wiki LM, fp32 vs fp8 [lm-fp32, lm-fp8].
4. ``lm-nvfp4``: the nvfp4 recipe (random Hadamard of order 16 on the wgrad operands + stochastic
   rounding of dY) vs the same formats with round-to-nearest dY and no Hadamard, passed through
   ``train``'s ``overrides`` as ``("*", formats)`` [lm-nvfp4, lm-nvfp4-plain].
5. ``lm-optim``: weights on the ``fp8_e4m3`` grid (per-tensor scale), GEMMs in fp32, Adam rule:
   master weights vs ECO vs naive rounding vs stochastic rounding [lm-master, lm-eco, lm-naive, lm-sr];
   ``lm-optim-mxfp4``: the same on the coarser ``mxfp4`` grid [lm-master-mxfp4, ...].

``--merge`` keeps the rows already in ``--out-json`` and adds (or replaces) the requested ones.

Usage::

    python benchmarks/train_table.py                       # every row
    python benchmarks/train_table.py --rows fm-fp32,fm-fp8 --jobs 2
    python benchmarks/train_table.py --fmnist-steps 300 --lm-steps 150 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"

GRID = "fp8_e4m3"  # weight grid of the lm-optim rows
GRID2 = "mxfp4"  # a coarser grid (the mxfp4 recipe's weight format) for the lm-optim-mxfp4 rows

# name -> (group, task, description, train() keyword arguments; "overrides" given by name)
ROWS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "fm-fp32": ("fmnist-recipe", "fashion-mnist", "fp32, Adam", {"recipe": "fp32"}),
    "fm-fp8": ("fmnist-recipe", "fashion-mnist", "fp8 recipe (E4M3 X/W, E5M2 dY), Adam", {"recipe": "fp8"}),
    "fm-qat-int4": ("fmnist-qat", "fashion-mnist", "int4:channel weights: PTQ vs QAT",
                    {"recipe": "fp32", "qat": "int4:channel"}),
    "fm-qat-int2": ("fmnist-qat", "fashion-mnist", "int2:channel:mse weights: PTQ vs QAT",
                    {"recipe": "fp32", "qat": "int2:channel:mse"}),
    "lm-fp32": ("lm-recipe", "wiki-lm", "fp32, Adam", {"recipe": "fp32"}),
    "lm-fp8": ("lm-recipe", "wiki-lm", "fp8 recipe, Adam", {"recipe": "fp8"}),
    "lm-nvfp4": ("lm-nvfp4", "wiki-lm", "nvfp4 recipe (Hadamard-16 wgrad + SR dY)", {"recipe": "nvfp4"}),
    "lm-nvfp4-plain": ("lm-nvfp4", "wiki-lm", "nvfp4 formats, no Hadamard, nearest dY",
                       {"recipe": "nvfp4", "overrides": "nvfp4-plain"}),
    "lm-master": ("lm-optim", "wiki-lm", f"{GRID} weights, master fp32 copy",
                  {"recipe": "fp32", "optimizer": "master", "weight_format": GRID}),
    "lm-eco": ("lm-optim", "wiki-lm", f"{GRID} weights, ECO (error into momentum)",
               {"recipe": "fp32", "optimizer": "eco", "weight_format": GRID}),
    "lm-naive": ("lm-optim", "wiki-lm", f"{GRID} weights, naive round-to-nearest",
                 {"recipe": "fp32", "optimizer": "naive", "weight_format": GRID}),
    "lm-sr": ("lm-optim", "wiki-lm", f"{GRID} weights, stochastic rounding",
              {"recipe": "fp32", "optimizer": "sr", "weight_format": GRID}),
    **{f"lm-{o}-{GRID2}": ("lm-optim-mxfp4", "wiki-lm", f"{GRID2} weights, {d}",
                           {"recipe": "fp32", "optimizer": o, "weight_format": GRID2})
       for o, d in [("master", "master fp32 copy"), ("eco", "ECO (error into momentum)"),
                    ("naive", "naive round-to-nearest"), ("sr", "stochastic rounding")]},
}

GROUP_TITLES = {
    "fmnist-recipe": "1. Fashion-MNIST: fp32 vs fp8 (goal: within 0.5 points test accuracy)",
    "fmnist-qat": "2. Fashion-MNIST: PTQ vs QAT at 4 and 2 bits (goal: QAT recovers most of what PTQ loses)",
    "lm-recipe": "3. wiki-lm: fp32 vs fp8 (goal: final held-out loss within 1 %)",
    "lm-nvfp4": "4. wiki-lm: nvfp4 with vs without random Hadamard + stochastic rounding",
    "lm-optim": f"5. wiki-lm: weights on the {GRID} grid (goal: ECO within 2 % of master, naive clearly worse)",
    "lm-optim-mxfp4": f"5b. wiki-lm: weights on the coarser {GRID2} grid (same goal)",
}


def _overrides(name: str | None) -> list[tuple[str, Any]]:
    if name is None:
        return []
    if name == "nvfp4-plain":
        from mixq.training import recipe

        plain = recipe("nvfp4").with_(hadamard_wgrad=0, grad_output="nvfp4", wgrad_grad_output="nvfp4")
        return [("*", plain)]
    raise KeyError(name)


def run_one(name: str, steps: int, seed: int, eval_every: int, out: Path) -> None:
    """Child process: train row ``name`` and write its JSON to ``out``."""
    import torch

    torch.set_num_threads(1)
    from mixq.training.loop import train
    from mixq.training.tasks import get_task

    group, task_name, desc, kwargs = ROWS[name]
    kwargs = dict(kwargs)
    overrides = kwargs.pop("overrides", None)
    task = get_task(task_name)
    t0 = time.perf_counter()
    result = train(task, steps=steps, seed=seed, eval_every=eval_every, overrides=_overrides(overrides),
                   **kwargs)
    wall = time.perf_counter() - t0
    d = result.to_json()
    d.update(row=name, group=group, description=desc, overrides=overrides, wall_seconds=wall,
             torch_threads=torch.get_num_threads())
    out.write_text(json.dumps(d))


PRIORITY = ["fm-fp32", "fm-fp8", "fm-qat-int4", "fm-qat-int2", "lm-fp8", "lm-fp32", "lm-eco", "lm-master",
            "lm-naive", "lm-sr", "lm-nvfp4", "lm-nvfp4-plain"] + [f"lm-{o}-{GRID2}" for o in
                                                                  ("master", "eco", "naive", "sr")]


def run_all(names: list[str], args: argparse.Namespace, on_done: Any = None) -> list[dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    tmp = Path(tempfile.mkdtemp(prefix="train-table-"))
    # cheap, complete comparisons first, so that a cut-short run still has whole groups
    order = sorted(names, key=PRIORITY.index)
    pending = list(order)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    results: dict[str, dict[str, Any]] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            n = pending.pop(0)
            steps = args.lm_steps if ROWS[n][1] == "wiki-lm" else args.fmnist_steps
            every = args.lm_eval_every if ROWS[n][1] == "wiki-lm" else args.fmnist_eval_every
            cmd = [sys.executable, __file__, "--run-one", n, "--steps", str(steps), "--seed", str(args.seed),
                   "--eval-every", str(every), "--out", str(tmp / f"{n}.json")]
            running[n] = (subprocess.Popen(cmd, env=env, cwd=ROOT), time.perf_counter())
            print(f"[start] {n} ({steps} steps)", flush=True)
        time.sleep(1.0)
        for n, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[n]
            path = tmp / f"{n}.json"
            if proc.returncode != 0 or not path.exists():
                print(f"[fail]  {n}: exit {proc.returncode}", flush=True)
                results[n] = {"row": n, "group": ROWS[n][0], "error": f"exit {proc.returncode}"}
                continue
            results[n] = json.loads(path.read_text())
            r = results[n]
            print(f"[done]  {n}: {r['metric']}={r['metrics'][r['metric']]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if on_done is not None:
                on_done([results[m] for m in names if m in results])
    return [results[n] for n in names if n in results]


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Low-precision training table", "",
             ("" if meta.get("complete") else "**Partial: written while the run was in progress "
              f"({len(rows)} of {len(meta['rows_requested'])} rows done).** "),
             f"Generated by `{meta['command']}` in {meta['wall_seconds']:.0f} s wall "
             f"({meta['jobs']} processes at a time, 1 torch thread each, CPU). "
             f"Every row uses seed {meta['seed']} (model init, batch order, rounding/Hadamard seeds) and "
             f"Adam at the task's default lr (1e-3); Fashion-MNIST rows train {meta['fmnist_steps']} steps "
             f"(batch 64), wiki-lm rows {meta['lm_steps']} steps (16 windows of 128 bytes). "
             "One seed only: differences of a few tenths of a point (Fashion-MNIST) or ~1 % (wiki-lm) "
             "are within seed noise and not resolved by this table.", "",
             "Metrics: Fashion-MNIST test accuracy on the 10k test images (higher is better); wiki-lm held-out "
             "loss in nats/byte on 16 test windows (lower is better). `train loss` is the mean of the last "
             "10 % of steps. `ms/step` is the median step time (emulated formats are simulated in fp32, so "
             "slower than fp32, not faster).", ""]
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    order = list(ROWS)
    for group_rows in by_group.values():
        group_rows.sort(key=lambda r: order.index(r["row"]))  # the first row of ROWS is the baseline
    for group, title in GROUP_TITLES.items():
        if group not in by_group:
            continue
        lines += [f"## {title}", ""]
        if group == "fmnist-qat":
            lines += ["QAT trains the fake-quantized model from the seed's random init (learned LSQ steps) for the "
                      "same number of steps; PTQ rounds the weights of the fp32 model trained with the same seed "
                      "to nearest on the same spec. `PTQ loss`/`QAT loss`: points below that fp32 model; "
                      "`recovered` = 1 - QAT loss / PTQ loss (only meaningful when PTQ loses something).", "",
                      "| row | weights | fp32 model acc | PTQ acc | QAT acc | PTQ loss (pts) | "
                      "QAT loss (pts) | recovered | QAT ms/step |", "|---|---|---|---|---|---|---|---|---|"]
            for r in by_group[group]:
                if "error" in r:
                    lines.append(f"| {r['row']} | failed: {r['error']} |||||||")
                    continue
                fp, pq = r["ptq"]["fp32"]["test_accuracy"], r["ptq"]["ptq"]["test_accuracy"]
                qa = r["metrics"]["test_accuracy"]
                lost, qlost = 100 * (fp - pq), 100 * (fp - qa)
                rec = "-" if lost <= 0 else f"{100 * (1 - qlost / lost):.0f} %"
                lines.append(f"| {r['row']} | `{r['qat']}` | {fp:.4f} | {pq:.4f} | {qa:.4f} | {lost:.2f} | "
                             f"{qlost:.2f} | {rec} | {1000 * r['median_step_seconds']:.0f} |")
        else:
            if group.startswith("lm-optim"):
                lines += ["GEMMs in fp32; the weights of the quantized layers live on the grid (projected once at "
                          "init), Adam rule, lr 1e-3; embeddings, norms and the kept `lm_head` in fp32. "
                          + (f"The {GRID} grid was chosen before the run." if group == "lm-optim" else
                             f"These {GRID2} rows were added after seeing that naive rounding on {GRID} does "
                             "not stall much in 150 steps."), ""]
            base = by_group[group][0]
            lines += ["| row | setting | final metric | vs first row | train loss | ms/step | notes |",
                      "|---|---|---|---|---|---|---|"]
            for r in by_group[group]:
                if "error" in r:
                    lines.append(f"| {r['row']} | failed: {r['error']} ||||||")
                    continue
                m = r["metrics"][r["metric"]]
                b = base["metrics"][base["metric"]] if "error" not in base else None
                if b is None or r is base:
                    delta = "-"
                elif r["metric"] == "test_accuracy":
                    delta = f"{100 * (m - b):+.2f} pts"
                else:
                    delta = f"{100 * (m / b - 1):+.2f} %"
                notes = "; ".join(r.get("notes") or []) or ""
                lines.append(f"| {r['row']} | {r['description']} | {r['metric']} {m:.4f} | {delta} | "
                             f"{_fmt(r['final_train_loss'])} | {1000 * r['median_step_seconds']:.0f} | {notes} |")
        lines.append("")
    return "\n".join(lines)


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(rows: list[dict[str, Any]], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if "error" not in r and r["task"] == task]
    if not chosen:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    k = 20 if task == "fashion-mnist" else 10
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(chosen):
        label = f"{r['row']}: " + (f"QAT {r['qat']} (PTQ has no training curve)" if r.get("qat")
                                   else r["description"])
        ax.plot(range(1, len(r["losses"]) + 1), _smooth(r["losses"], k), label=label, lw=1.3,
                color=colors[(2 * i) % 20 + (2 * i) // 20 % 2], ls="--" if i >= 10 else "-")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving mean of {k} steps)")
    seed = chosen[0]["seed"]
    ax.set_title(f"{task}: training loss, seed {seed}")
    if task == "wiki-lm":
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="all", help="comma-separated row names or 'all' (" + ", ".join(ROWS) + ")")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fmnist-steps", type=int, default=300)
    p.add_argument("--lm-steps", type=int, default=150)
    p.add_argument("--fmnist-eval-every", type=int, default=0)
    p.add_argument("--lm-eval-every", type=int, default=50)
    p.add_argument("--out-json", default=str(RESULTS / "train-table.json"))
    p.add_argument("--out-md", default=str(RESULTS / "train-table.md"))
    p.add_argument("--img-dir", default=str(IMG))
    p.add_argument("--merge", action="store_true",
                   help="keep the rows already in --out-json (those not rerun) and add the new ones")
    p.add_argument("--run-one", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--eval-every", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_one:
        run_one(args.run_one, args.steps, args.seed, args.eval_every, Path(args.out))
        return
    names = list(ROWS) if args.rows == "all" else [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    t0 = time.perf_counter()
    old_rows: list[dict[str, Any]] = []
    old_meta: dict[str, Any] = {}
    if args.merge and Path(args.out_json).exists():
        old = json.loads(Path(args.out_json).read_text())
        old_rows = [r for r in old["rows"] if r["row"] not in names]
        old_meta = old["meta"]
    prior = old_meta.get("runs", [{k: old_meta[k] for k in ("command", "wall_seconds") if k in old_meta}]
                         if old_meta else [])
    command = "python benchmarks/train_table.py " + " ".join(sys.argv[1:])

    def write(new_rows: list[dict[str, Any]], complete: bool = False) -> float:
        wall = time.perf_counter() - t0
        rows = sorted(old_rows + new_rows, key=lambda r: list(ROWS).index(r["row"]))
        runs = prior + [{"command": command, "wall_seconds": wall}]
        meta = {"command": " && ".join(r["command"] for r in runs),
                "wall_seconds": sum(r["wall_seconds"] for r in runs), "runs": runs,
                "complete": complete, "rows_requested": [r["row"] for r in old_rows] + names, "jobs": args.jobs, "seed": args.seed,
                "fmnist_steps": args.fmnist_steps, "lm_steps": args.lm_steps, "torch_threads_per_process": 1,
                "grid": GRID}
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        Path(args.out_md).write_text(markdown(rows, meta) + "\n")
        plot(rows, "fashion-mnist", Path(args.img_dir) / "train-fashion-mnist.png")
        plot(rows, "wiki-lm", Path(args.img_dir) / "train-wiki-lm.png")
        return wall

    new_rows = run_all(names, args, on_done=write)
    wall = write(new_rows, complete=True)
    print(f"wrote {args.out_json}, {args.out_md}, plots in {args.img_dir} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
