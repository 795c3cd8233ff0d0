"""Low-precision training table: recipes, QAT vs PTQ, nvfp4 ablation and grid optimizers.

Runs a named set of rows through :func:`mixq.training.loop.train` for each seed of ``--seeds``, each
(row, seed) in its own process (``--jobs`` at a time, each with one torch thread and
``OMP_NUM_THREADS=1``); every row runs the same seeds, so differences are paired per seed. Writes

* ``benchmarks/results/train-table.json`` (every run's ``TrainResult.to_json()`` plus its settings),
* ``benchmarks/results/train-table.md`` (mean and standard deviation over seeds, grouped by comparison),
* ``docs/img/train-fashion-mnist.png`` and ``docs/img/train-wiki-lm.png`` (training-loss curves, mean
  over seeds).

Groups (row names in brackets):

1. ``fmnist-recipe``: Fashion-MNIST CNN, fp32 vs the fp8 recipe [fm-fp32, fm-fp8].
2. ``fmnist-qat``: 4-bit and 2-bit per-tensor weights, PTQ of the fp32-trained model (round to
   nearest) vs QAT fine-tuning of that model for half as many steps (``qat_init="fp32"``, lr 3e-4),
   with the first and last layers kept in fp32 (the task's default) or every layer quantized
   (``-all``); ``fm-qat-int2-scratch`` trains QAT from the random init instead [fm-qat-int4, ...].
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
    python benchmarks/train_table.py --fmnist-steps 300 --lm-steps 200 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
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
FT_LR = 3e-4  # QAT fine-tuning rate (Adam), chosen from one seed-0 probe (1e-3 did as well) before the table

# name -> (group, task, description, train() keyword arguments; "overrides" given by name)
ROWS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "fm-fp32": ("fmnist-recipe", "fashion-mnist", "fp32, Adam", {"recipe": "fp32"}),
    "fm-fp8": ("fmnist-recipe", "fashion-mnist", "fp8 recipe (E4M3 X/W, E5M2 dY), Adam", {"recipe": "fp8"}),
    **{f"fm-qat-int{bits}{tag}": ("fmnist-qat", "fashion-mnist",
                               f"int{bits}:tensor, {what}: PTQ vs QAT fine-tuning",
                               {"recipe": "fp32", "qat": f"int{bits}:tensor", "qat_init": "fp32", "lr": FT_LR,
                                **({"keep": ()} if tag else {})})
       for bits in (4, 2) for tag, what in (("", "first/last layers fp32"), ("-all", "every layer"))},
    "fm-qat-int2-scratch": ("fmnist-qat", "fashion-mnist", "int2:tensor, first/last fp32: QAT from random init",
                            {"recipe": "fp32", "qat": "int2:tensor"}),
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
    "lm-optim-mxfp4": f"5. wiki-lm: weights on the {GRID2} grid (goal: ECO within 2 % of master, naive clearly "
                      "worse)",
    "lm-optim": f"5b. wiki-lm: weights on the finer {GRID} grid (same goal)",
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
    """Child process: train row ``name`` with ``seed`` and write its JSON to ``out``.

    Fine-tuning rows (``qat_init="fp32"``) pretrain ``steps`` fp32 steps and fine-tune ``steps // 2``.
    """
    import torch

    torch.set_num_threads(1)
    from mixq.training.loop import train
    from mixq.training.tasks import get_task

    group, task_name, desc, kwargs = ROWS[name]
    kwargs = dict(kwargs)
    overrides = kwargs.pop("overrides", None)
    if kwargs.get("qat_init") == "fp32":
        kwargs["pretrain_steps"] = steps
        steps = max(1, steps // 2)
    task = get_task(task_name)
    t0 = time.perf_counter()
    result = train(task, steps=steps, seed=seed, eval_every=eval_every, overrides=_overrides(overrides),
                   **kwargs)
    wall = time.perf_counter() - t0
    d = result.to_json()
    d.update(row=name, group=group, description=desc, overrides=overrides, wall_seconds=wall,
             torch_threads=torch.get_num_threads())
    out.write_text(json.dumps(d))


PRIORITY = (["fm-fp32", "fm-fp8", "fm-qat-int2", "fm-qat-int4", "fm-qat-int2-all", "fm-qat-int4-all",
             "fm-qat-int2-scratch", "lm-fp32", "lm-fp8", "lm-nvfp4", "lm-nvfp4-plain"]
            + [f"lm-{o}-{GRID2}" for o in ("master", "eco", "naive", "sr")]
            + ["lm-master", "lm-eco", "lm-naive", "lm-sr"])


def run_all(names: list[str], seeds: list[int], args: argparse.Namespace,
            on_done: Any = None) -> list[dict[str, Any]]:
    """Run every (row, seed); returns the run dicts (failed runs carry ``error``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    tmp = Path(tempfile.mkdtemp(prefix="train-table-"))
    # seed by seed, cheap complete comparisons first: a cut-short run still has whole groups
    pending = [(n, s) for s in seeds for n in sorted(names, key=PRIORITY.index)]
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    results: dict[tuple[str, int], dict[str, Any]] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            n, seed = pending.pop(0)
            steps = args.lm_steps if ROWS[n][1] == "wiki-lm" else args.fmnist_steps
            every = args.lm_eval_every if ROWS[n][1] == "wiki-lm" else args.fmnist_eval_every
            cmd = [sys.executable, __file__, "--run-one", n, "--steps", str(steps), "--seed", str(seed),
                   "--eval-every", str(every), "--out", str(tmp / f"{n}-{seed}.json")]
            running[(n, seed)] = (subprocess.Popen(cmd, env=env, cwd=ROOT), time.perf_counter())
            print(f"[start] {n} seed {seed} ({steps} steps)", flush=True)
        time.sleep(1.0)
        for key, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            n, seed = key
            path = tmp / f"{n}-{seed}.json"
            if proc.returncode != 0 or not path.exists():
                print(f"[fail]  {n} seed {seed}: exit {proc.returncode}", flush=True)
                results[key] = {"row": n, "seed": seed, "group": ROWS[n][0], "error": f"exit {proc.returncode}"}
                continue
            results[key] = r = json.loads(path.read_text())
            print(f"[done]  {n} seed {seed}: {r['metric']}={r['metrics'][r['metric']]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if on_done is not None:
                on_done(list(results.values()))
    return list(results.values())


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def _ms(xs: list[float], digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
    """``mean ± std`` of ``xs`` times ``scale`` (just the value for one seed)."""
    if not xs:
        return "-"
    m, sd = _mean_std([scale * x for x in xs])
    return f"{m:.{digits}f}{unit}" if len(xs) == 1 else f"{m:.{digits}f} ± {sd:.{digits}f}{unit}"


def _by_row(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        if "error" not in r:
            out.setdefault(r["row"], {})[r["seed"]] = r
    return out


def _final(r: dict[str, Any]) -> float:
    return r["metrics"][r["metric"]]


def _qat_lines(rows: list[str], by_row: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    lines = ["PTQ rounds the weights of the fp32 model (trained the table's Fashion-MNIST steps) to nearest "
             "with one absmax scale per tensor. QAT fine-tunes that same model (learned LSQ steps initialized "
             "from the same absmax scales) for half as many more steps at lr 3e-4; `fp32 +steps` trains an "
             "fp32 copy the same extra steps (same batches and rate): the fair ceiling for QAT, since QAT trained "
             "longer. `PTQ loss` = fp32 - PTQ; `QAT loss` = fp32 +steps - QAT (points); `recovered` = "
             "1 - QAT loss / PTQ loss, from the means, shown where PTQ loses at least 0.5 points. "
             "`-scratch`: QAT from the random init for the full steps (its ceiling is the fp32 model).", "",
             "| row | weights | layers | fp32 | PTQ | QAT | fp32 +steps | PTQ loss (pts) | QAT loss (pts) | "
             "recovered | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in rows:
        runs = list(by_row.get(name, {}).values())
        if not runs:
            continue
        fp = [r["ptq"]["fp32"]["test_accuracy"] for r in runs]
        pq = [r["ptq"]["ptq"]["test_accuracy"] for r in runs]
        qa = [r["metrics"]["test_accuracy"] for r in runs]
        ceil = [r["ptq"].get("fp32_continued", r["ptq"]["fp32"])["test_accuracy"] for r in runs]
        lost = [100 * (a - b) for a, b in zip(fp, pq)]
        qlost = [100 * (a - b) for a, b in zip(ceil, qa)]
        m_lost, m_qlost = _mean_std(lost)[0], _mean_std(qlost)[0]
        rec = f"{100 * (1 - m_qlost / m_lost):.0f} %" if m_lost >= 0.5 else "-"
        layers = "all" if ROWS[name][3].get("keep") == () else "first/last fp32"
        lines.append(f"| {name} | `{runs[0]['qat']}` | {layers} | {_ms(fp)} | {_ms(pq)} | {_ms(qa)} | "
                     f"{_ms(ceil) if runs[0].get('qat_init') == 'fp32' else '-'} | {_ms(lost, 2)} | "
                     f"{_ms(qlost, 2)} | {rec} | {len(runs)} |")
    return lines


def _compare_lines(group: str, rows: list[str], by_row: dict[str, dict[int, dict[str, Any]]]) -> list[str]:
    lines = []
    if group.startswith("lm-optim"):
        lines += ["GEMMs in fp32; the weights of the quantized layers live on the grid (projected once at init), "
                  "Adam rule, lr 1e-3; embeddings, norms and the kept `lm_head` in fp32.", ""]
    base = by_row.get(rows[0], {})
    lines += ["| row | setting | final metric | vs first row (paired per seed) | train loss | ms/step | seeds |",
              "|---|---|---|---|---|---|---|"]
    for name in rows:
        runs = by_row.get(name, {})
        if not runs:
            continue
        values = [_final(r) for r in runs.values()]
        first = next(iter(runs.values()))
        paired = [s for s in runs if s in base]
        if name == rows[0] or not paired:
            delta = "-"
        elif first["metric"] == "test_accuracy":
            delta = _ms([_final(runs[s]) - _final(base[s]) for s in paired], 2, 100, " pts")
        else:
            delta = _ms([_final(runs[s]) / _final(base[s]) - 1 for s in paired], 2, 100, " %")
        train_loss = [r["final_train_loss"] for r in runs.values()]
        ms = _mean_std([r["median_step_seconds"] for r in runs.values()])[0]
        lines.append(f"| {name} | {ROWS[name][2]} | {first['metric']} {_ms(values)} | {delta} | "
                     f"{_ms(train_loss)} | {1000 * ms:.0f} | {len(runs)} |")
    return lines


def markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by_row = _by_row(runs)
    failed = [f"{r['row']} seed {r['seed']} ({r['error']})" for r in runs if "error" in r]
    seeds = meta["seeds"]
    lines = ["# Low-precision training table", "",
             ("" if meta.get("complete") else "**Partial: written while the run was in progress.** ")
             + f"Generated by `{meta['command']}` in {meta['wall_seconds']:.0f} s wall "
             f"({meta['jobs']} processes at a time, 1 torch thread each, CPU). Seeds {seeds}: every row runs "
             "every seed (model init, batch order, rounding and Hadamard seeds), so a difference between rows "
             "is paired per seed. Values are mean ± standard deviation over the seeds. Adam at the task's "
             f"default lr (1e-3); Fashion-MNIST rows train {meta['fmnist_steps']} steps (batch 64), wiki-lm "
             f"rows {meta['lm_steps']} steps (16 windows of 128 bytes; a byte-level Llama of "
             f"{meta.get('lm_parameters', '?')} parameters).", "",
             "Metrics: Fashion-MNIST test accuracy on the 10k test images (higher is better); wiki-lm held-out "
             "loss in nats/byte on 16 test windows (lower is better). `train loss` is the mean of the last "
             "10 % of steps. `ms/step` is the median step time (emulated formats are simulated in fp32, so "
             "slower than fp32, not faster; other processes ran alongside).", ""]
    if failed:
        lines += [f"Failed runs: {', '.join(failed)}.", ""]
    for group, title in GROUP_TITLES.items():
        rows = [n for n in ROWS if ROWS[n][0] == group and n in by_row]
        if not rows:
            continue
        lines += [f"## {title}", ""]
        lines += _qat_lines(rows, by_row) if group == "fmnist-qat" else _compare_lines(group, rows, by_row)
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


def plot(runs: list[dict[str, Any]], task: str, path: Path) -> None:
    """Training loss per row (moving mean, then mean over the row's seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_row = {n: rs for n, rs in _by_row(runs).items() if ROWS[n][1] == task}
    if not by_row:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    k = 20 if task == "fashion-mnist" else 10
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(n for n in ROWS if n in by_row):
        curves = [_smooth(r["losses"], k) for r in by_row[name].values()]
        length = min(len(c) for c in curves)
        mean = [sum(c[j] for c in curves) / len(curves) for j in range(length)]
        first = next(iter(by_row[name].values()))
        label = f"{name}: " + (f"QAT {first['qat']}" + (" (fine-tuning steps)" if first.get("qat_init") == "fp32"
                                                        else "") if first.get("qat") else ROWS[name][2])
        ax.plot(range(1, length + 1), mean, label=label, lw=1.3,
                color=colors[(2 * i) % 20 + (2 * i) // 20 % 2], ls="--" if i >= 10 else "-")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving mean of {k} steps, mean over seeds)")
    seeds = sorted({r["seed"] for rs in by_row.values() for r in rs.values()})
    ax.set_title(f"{task}: training loss, seeds {seeds}")
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
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, every row runs each")
    p.add_argument("--fmnist-steps", type=int, default=300)
    p.add_argument("--lm-steps", type=int, default=200)
    p.add_argument("--fmnist-eval-every", type=int, default=0)
    p.add_argument("--lm-eval-every", type=int, default=50)
    p.add_argument("--out-json", default=str(RESULTS / "train-table.json"))
    p.add_argument("--out-md", default=str(RESULTS / "train-table.md"))
    p.add_argument("--img-dir", default=str(IMG))
    p.add_argument("--merge", action="store_true",
                   help="keep the runs already in --out-json (those not rerun) and add the new ones")
    p.add_argument("--run-one", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
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
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    t0 = time.perf_counter()
    old_runs: list[dict[str, Any]] = []
    old_meta: dict[str, Any] = {}
    if args.merge and Path(args.out_json).exists():
        old = json.loads(Path(args.out_json).read_text())
        old_runs = [r for r in old["rows"] if (r["row"], r.get("seed")) not in {(n, s) for n in names for s in seeds}]
        old_meta = old["meta"]
    prior = old_meta.get("runs", [])
    command = "python benchmarks/train_table.py " + " ".join(sys.argv[1:])

    def write(new_runs: list[dict[str, Any]], complete: bool = False) -> float:
        wall = time.perf_counter() - t0
        runs = sorted(old_runs + new_runs, key=lambda r: (list(ROWS).index(r["row"]), r.get("seed", 0)))
        history = prior + [{"command": command, "wall_seconds": wall}]
        lm = next((r for r in runs if r.get("task") == "wiki-lm" and "parameters" in r), None)
        meta = {"command": " && ".join(h["command"] for h in history),
                "wall_seconds": sum(h["wall_seconds"] for h in history), "runs": history,
                "complete": complete, "jobs": args.jobs,
                "seeds": sorted({r["seed"] for r in runs if "seed" in r} | set(seeds)),
                "fmnist_steps": args.fmnist_steps, "lm_steps": args.lm_steps, "torch_threads_per_process": 1,
                "grid": GRID, "lm_parameters": lm["parameters"] if lm else None}
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps({"meta": meta, "rows": runs}, indent=1))
        Path(args.out_md).write_text(markdown(runs, meta) + "\n")
        plot(runs, "fashion-mnist", Path(args.img_dir) / "train-fashion-mnist.png")
        plot(runs, "wiki-lm", Path(args.img_dir) / "train-wiki-lm.png")
        return wall

    new_runs = run_all(names, seeds, args, on_done=write)
    wall = write(new_runs, complete=True)
    print(f"wrote {args.out_json}, {args.out_md}, plots in {args.img_dir} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
