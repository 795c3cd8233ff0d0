"""Streamed vs in-memory GPTQ of SmolLM2-135M: peak memory, wall time, identical output.

Each path runs in its own subprocess at one thread: ``quantize_streamed`` with a ``max_memory``
budget below the model's fp32 size, and ``pipeline.quantize`` (the whole model in memory), both
int4:g64 GPTQ with the tied LM head kept. Calibration is reduced from the wiki-smollm2 protocol to
32 windows of 128 tokens (seed 0), batch 4, so that the streamed run fits a budget of 500 MiB (the
fp32 weights are 513 MiB; the up-front estimate for 64 x 512 windows, batch 8, is 869 MiB, most of it
calibration activations and GPTQ's fp64 Hessian inverse of the 1536-wide down projections).

Each process reports its peak RSS (``VmHWM``), its RSS after imports and a warm-up quantization of a
small matrix (numba compiles its kernels once), and the difference; the peak is reset after the
warm-up through ``/proc/self/clear_refs``. The outputs are compared tensor by tensor. Wall time
depends on what else the machine runs (the 1-minute load average before and after each run is
recorded); the CPU time of the quantization step (``cpu_s``) is the fairer ratio.

    python benchmarks/streaming.py [--budget 500M] [--samples 32] [--length 128] [--out benchmarks/results]

Writes ``streaming.json``.
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

CHILD = r"""
import json, sys, time
from pathlib import Path

from mixq.run_info import process_memory as status

import torch
torch.set_num_threads(1)
from transformers import LlamaForCausalLM
from mixq.algorithms.gptq import gptq
from mixq.algorithms.rtn import rtn
from mixq.pipeline import quantize
from mixq.plan import LayerSpec, Plan
from mixq.quant import QuantSpec
from mixq.streaming import quantize_streamed

mode, out = sys.argv[1], sys.argv[2]
budget, samples, length = (int(a) for a in sys.argv[3:6])
spec = QuantSpec.parse("int4:g64")
W, X = torch.randn(576, 576), torch.randn(1024, 576)
rtn(W, spec, None), gptq(W, X.T @ X, spec)
del W, X
plan = Plan.uniform(LayerSpec(weights=spec, algorithm="gptq"))
kw = dict(calib="wiki", samples=samples, length=length, batch_size=4, out=out)
base = status("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")
t0 = time.perf_counter()
if mode == "stream":
    o = quantize_streamed("smollm2", plan, max_memory=budget, **kw)
else:
    o = quantize("smollm2", plan, **kw)
wall = time.perf_counter() - t0
meta = json.loads((Path(out) / "mixq.json").read_text())
print(json.dumps({"mode": mode, "wall_s": wall, "quantize_s": o.report.seconds, "cpu_s": o.cpu_seconds,
                  "load_s": o.load_seconds,
                  "base_rss_mib": base / 2**20, "peak_rss_mib": status("VmHWM:") / 2**20,
                  "peak_over_base_mib": (status("VmHWM:") - base) / 2**20,
                  "estimate_mib": meta.get("streamed", {}).get("estimated_bytes", 0) / 2**20 or None}))
"""


def run(mode: str, out: Path, budget: int, samples: int, length: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    argv = [sys.executable, "-c", CHILD, mode, str(out), str(budget), str(samples), str(length)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    result["load_average_1min"] = [load, os.getloadavg()[0]]  # before, after: the machine is shared
    return result


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    from mixq.model.lazy import LazyCheckpoint

    ca, cb = LazyCheckpoint(a), LazyCheckpoint(b)
    if sorted(ca.names()) != sorted(cb.names()):
        return False
    for name in ca.names():
        if not torch.equal(ca.read([name], None)[name], cb.read([name], None)[name]):
            return False
    sa, sb = load_file(a / "scales.safetensors"), load_file(b / "scales.safetensors")
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def main() -> None:
    from mixq.model.lazy import LazyCheckpoint
    from mixq.model.load import resolve
    from mixq.stream_memory import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", default="500M")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    budget = parse_size(args.budget)
    fp32 = LazyCheckpoint(resolve("smollm2")).nbytes()
    with tempfile.TemporaryDirectory() as tmp:
        streamed = run("stream", Path(tmp) / "stream", budget, args.samples, args.length)
        memory = run("memory", Path(tmp) / "memory", budget, args.samples, args.length)
        identical = same_weights(Path(tmp) / "stream", Path(tmp) / "memory")
    result = {
        "meta": {"threads": 1, "machine": f"{platform.machine()} {os.cpu_count()} cores",
                 "date": time.strftime("%Y-%m-%d"), "model": "smollm2",
                 "spec": "int4:g64 gptq (lm_head kept)",
                 "calibration": f"wiki, {args.samples} x {args.length} tokens, seed 0, batch 4",
                 "budget_mib": budget / 2**20, "fp32_weights_mib": fp32 / 2**20},
        "streamed": streamed, "in_memory": memory, "identical": identical,
        "peak_ratio": streamed["peak_over_base_mib"] / memory["peak_over_base_mib"],
        "wall_ratio": streamed["wall_s"] / memory["wall_s"],
        "cpu_ratio": streamed["cpu_s"] / memory["cpu_s"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "streaming.json"
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_path, path)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
