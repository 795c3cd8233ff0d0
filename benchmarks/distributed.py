"""Data-parallel GPTQ on SmolLM2: 1 process against N processes (torchrun, gloo, 1 thread each).

Each run is ``torchrun --nproc_per_node N benchmarks/distributed.py --worker ...``, which calls
:func:`mixq.pipeline.quantize` exactly as ``mixq quantize`` does (under torchrun with N = 1 it is the
plain one-process path) on the wiki-smollm2 protocol's calibration, with fewer windows by default
(``--samples 32``: half the protocol's 64, to keep the single-process run near 10 minutes on this
machine). Rank 0 records each block's wall time (from the progress callback) and each layer's
GPTQ solve time, every rank its peak RSS and the time spent in reductions. Each run folder is then
evaluated with ``mixq eval RUN --no-reference`` (perplexity on the protocol's test windows) and the
quantized weights of the runs are compared.

    python benchmarks/distributed.py [--procs 1,2] [--samples 32] [--eval-windows 32] [--out benchmarks/results]

Writes ``distributed.json`` (atomically) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One rank of a run (started by torchrun); rank 0 writes ``args.result``."""
    import torch

    from mixq.plan import LayerSpec, Plan
    from mixq.quant import QuantSpec

    torch.set_num_threads(1)
    from mixq.pipeline import quantize

    stamps: list[tuple[int, float]] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "blocks":
            stamps.append((done, time.perf_counter()))

    plan = Plan.uniform(LayerSpec(weights=QuantSpec.parse(args.spec), algorithm="gptq"))
    t0 = time.perf_counter()
    outcome = quantize("smollm2", plan, calib="wiki", samples=args.samples, length=args.length,
                       batch_size=args.batch_size, out=args.run_dir, overwrite=True, progress=progress)
    process_s = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:
        return
    blocks = [b - a for (_, a), (_, b) in zip(stamps, stamps[1:])]
    solve: dict[int, float] = {}
    for layer in outcome.report.layers:
        parts = layer.name.split(".")
        if "layers" in parts:
            i = int(parts[parts.index("layers") + 1])
            solve[i] = solve.get(i, 0.0) + layer.seconds
    result = {"wall_s": outcome.report.seconds, "cpu_s": outcome.cpu_seconds, "process_s": process_s,
              "load_s": outcome.load_seconds, "calib_tokenize_s": outcome.calib_seconds,
              "peak_rss_mb": outcome.peak_rss_mb, "distributed": outcome.distributed,
              "block_s": blocks, "block_solve_s": [solve.get(i, 0.0) for i in range(len(blocks))],
              "layers": [{"name": r.name, "loss": r.loss, "seconds": r.seconds} for r in outcome.report.layers]}
    Path(args.result).write_text(json.dumps(result, indent=1))


def run_procs(n: int, args: argparse.Namespace, run_dir: Path, result: Path, port: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port),
           str(Path(__file__).resolve()), "--worker", "--run-dir", str(run_dir), "--result", str(result),
           "--samples", str(args.samples), "--length", str(args.length), "--batch-size", str(args.batch_size),
           "--spec", args.spec]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{n} processes failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(result.read_text()), "torchrun_s": time.perf_counter() - t0}


def perplexity(run_dir: Path, windows: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mixq", "eval", str(run_dir), "--no-reference", "--windows", str(windows), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"eval of {run_dir} failed:\n{proc.stderr[-3000:]}")
    return float(json.loads(proc.stdout)["ppl"])


def compare_weights(a: Path, b: Path) -> dict:
    """Fraction of block linear weights that differ between two run folders, and the largest change."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    keys = [k for k in wa if ".layers." in k and k.endswith("proj.weight")]
    differ = sum(int((wa[k] != wb[k]).sum()) for k in keys)
    total = sum(wa[k].numel() for k in keys)
    return {"weights": total, "differ": differ, "fraction_differ": differ / total,
            "max_abs_diff": max(float((wa[k] - wb[k]).abs().max()) for k in keys)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--procs", default="1,2", help="process counts to run (default 1,2)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (protocol: 64)")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--spec", default="int4:g64")
    p.add_argument("--eval-windows", type=int, default=32, help="perplexity test windows (protocol: 32)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from mixq.fileio import atomic_write_text

    procs = [int(x) for x in args.procs.split(",")]
    load0 = os.getloadavg()
    runs: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mixq-bench-dist-") as tmp:
        for i, n in enumerate(procs):
            run_dir = Path(tmp) / f"run-{n}"
            runs[n] = run_procs(n, args, run_dir, Path(tmp) / f"result-{n}.json", 29500 + 17 * i + os.getpid() % 97)
            runs[n]["ppl"] = perplexity(run_dir, args.eval_windows)
            print(f"{n} process(es): quantize {runs[n]['wall_s']:.1f} s, ppl {runs[n]['ppl']:.3f}", flush=True)
        base = procs[0]
        for n in procs[1:]:
            runs[n]["weights_vs_first"] = compare_weights(Path(tmp) / f"run-{base}", Path(tmp) / f"run-{n}")
            losses = [(a["loss"], b["loss"]) for a, b in zip(runs[base]["layers"], runs[n]["layers"])]
            runs[n]["max_rel_loss_diff_vs_first"] = max(abs(b / a - 1) for a, b in losses if a)
            runs[n]["speedup_vs_first"] = runs[base]["wall_s"] / runs[n]["wall_s"]
    meta = {"model": "smollm2", "spec": args.spec, "algorithm": "gptq", "samples": args.samples,
            "length": args.length, "batch_size": args.batch_size, "eval_windows": args.eval_windows,
            "threads_per_process": 1, "backend": "gloo", "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "load_average_before": load0, "load_average_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d"),
            "protocol": "wiki-smollm2 calibration (seed 0) with --samples windows; perplexity on --eval-windows"}
    out = args.out / "distributed.json"
    atomic_write_text(out, json.dumps({"meta": meta, "runs": {str(n): r for n, r in runs.items()}}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
