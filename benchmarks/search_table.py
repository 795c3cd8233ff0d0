"""Measure searched and uniform plans on SmolLM2: one ``mixq quantize --plan`` process per plan, in parallel.

``mixq frontier PROFILE --budgets ... --out DIR`` writes the plans (``DIR/plans/*.yaml``) and the
predicted frontier; this script quantizes every plan with the wiki-smollm2 protocol (64 x 512
calibration tokens, seed 0; the algorithm is the one stored in the plan), measures perplexity on the
32 test windows and KL / top-1 against fp32 on the first 8, and merges the rows into
``benchmarks/results/search-smollm2.{json,md}``. Rows already present are skipped unless ``--redo``.

    python benchmarks/search_table.py runs/frontier-gptq/plans/*.yaml [--jobs 2] [--threads 1] [--tag gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MIXQ = [sys.executable, "-m", "mixq"]


def run_plan(plan: Path, model: str, kl_windows: int, env: dict[str, str]) -> dict:
    """Quantize ``model`` with ``plan`` and evaluate, in a fresh process; the JSON row."""
    cmd = [*MIXQ, "quantize", model, "--plan", str(plan), "--eval", "--kl-windows", str(kl_windows), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "process_s": wall}
    result = json.loads(proc.stdout)
    ev, bits = result.get("eval", {}), result.get("bits", {})
    return {"ppl": ev.get("ppl"), "kl": ev.get("kl"), "top1": ev.get("top1"),
            "bits": bits.get("quantized_bits_per_weight"), "bits_all": bits.get("bits_per_weight"),
            "quantize_s": result.get("wall_s"), "quantize_cpu_s": result.get("cpu_s"),
            "peak_rss_mb": result.get("peak_rss_mb"), "process_s": wall}


def markdown(rows: dict[str, dict], meta: dict) -> str:
    def f(v: object, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    out = [f"SmolLM2-135M, wiki-smollm2 protocol; {meta['threads']} thread(s) per plan, {meta['jobs']} plans at a "
           f"time on {meta['machine']}; {meta['date']}.", "",
           "| plan | ppl | KL to fp32 (8 windows) | top-1 agree | bits/w (quantized) | quantize s | peak RSS MiB |",
           "|---|---|---|---|---|---|---|"]
    for name in sorted(rows, key=lambda n: (rows[n].get("bits") or 99, n)):
        r = rows[name]
        if "error" in r:
            out.append(f"| {name} | error: {r['error']} | | | | | |")
            continue
        out.append(f"| {name} | {f(r['ppl'], '.3f')} | {f(r['kl'], '.4f')} | {f(r['top1'], '.3f')} | "
                   f"{f(r['bits'], '.3f')} | {f(r['quantize_s'], '.0f')} | {f(r['peak_rss_mb'], '.0f')} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plans", nargs="+", type=Path, help="plan files (YAML); the row name is '<tag>/<stem>'")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tag", default="", help="prefix of the row names (e.g. gptq)")
    parser.add_argument("--jobs", type=int, default=2, help="plans quantized at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per plan")
    parser.add_argument("--kl-windows", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search-smollm2.json"))
    parser.add_argument("--redo", action="store_true", help="measure rows that are already in the result file")
    args = parser.parse_args()
    from mixq.fileio import atomic_write_text

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    data = json.loads(args.out.read_text()) if args.out.is_file() else {"meta": {}, "rows": {}}
    rows: dict[str, dict] = data["rows"]
    meta = {"threads": args.threads, "jobs": args.jobs, "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "protocol": "wiki-smollm2: 64x512 calibration, 32x512 test windows"}
    todo = [p for p in args.plans if args.redo or f"{args.tag}/{p.stem}" not in rows]

    lock = threading.Lock()

    def one(plan: Path) -> None:
        name = f"{args.tag}/{plan.stem}"
        row = {**run_plan(plan, args.model, args.kl_windows, env), "plan": str(plan)}
        with lock:
            rows[name] = row
            print(json.dumps({"name": name, **row}), flush=True)
            atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
            atomic_write_text(args.out.with_suffix(".md"), markdown(rows, meta))

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, todo))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
