"""qdq-throughput protocol (../shared/BENCHMARKS.md): speed of fake-quantize on a 4096 x 4096 fp32 tensor.

For each spec: the first call (includes numba compilation or loading it from the on-disk cache),
then the median of ``--repeats`` calls, once returning a new tensor (what ``fake_quantize(x, spec)``
costs) and once writing into a preallocated ``out=`` (the same conditions as the baseline).
Throughput counts 8 bytes per element (one fp32 read, one fp32 write). Baseline in the same run:
``out.copy_(x)`` into a preallocated tensor. Peers where installed: an ml_dtypes cast round trip
(fp32 -> format -> fp32), which is per-tensor and unscaled, so less work than a real quantizer.

Unless ``--no-thp``, the script sets ``THP_MEM_ALLOC_ENABLE=1`` before importing torch, so large
tensors get transparent huge pages (on this VM a fresh 64 MB tensor otherwise costs ~40 ms of
page faults, five times the copy itself).

    python benchmarks/qdq_throughput.py [--threads N] [--repeats R] [--json FILE] [--backend auto|torch]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402  (after the allocator setting)

DEFAULT_SPECS = ["int4:g128", "int8:channel", "fp8_e4m3", "fp6_e3m2:g32", "mxfp4", "mxfp8_e4m3", "nvfp4",
                 "nf4:g64", "int4:g64:asym", "mxfp4:sr"]
ML_DTYPES_PEERS = {"fp8_e4m3": "float8_e4m3fn", "mxfp8_e4m3": "float8_e4m3fn", "mxfp4": "float4_e2m1fn",
                   "fp6_e3m2:g32": "float6_e3m2fn"}


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of ``repeats`` later calls in seconds)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--specs", default=",".join(DEFAULT_SPECS))
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "numba"])
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--no-thp", action="store_true", help="leave torch's allocator without huge pages")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        import numba
        numba.set_num_threads(args.threads)
    except ImportError:
        pass
    import mixq

    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(x)
    nbytes = 8 * x.numel()
    _, t_copy = timed(lambda: out.copy_(x), args.repeats)
    rows = [{"spec": "copy (baseline)", "first_s": None, "median_ms": t_copy * 1e3,
             "gb_s": nbytes / t_copy / 1e9, "ratio": 1.0, "out_median_ms": None, "out_ratio": None}]
    for spec in args.specs.split(","):
        first, t = timed(lambda: mixq.fake_quantize(x, spec, backend=args.backend), args.repeats)
        _, t_out = timed(lambda: mixq.fake_quantize(x, spec, backend=args.backend, out=out), args.repeats)
        rows.append({"spec": spec, "first_s": first, "median_ms": t * 1e3, "gb_s": nbytes / t / 1e9,
                     "ratio": t_copy / t, "out_median_ms": t_out * 1e3, "out_ratio": t_copy / t_out})
    try:
        import ml_dtypes
        import numpy as np
        xn = x.numpy()
        for spec, dt in ML_DTYPES_PEERS.items():
            dtype = getattr(ml_dtypes, dt)
            _, t = timed(lambda: xn.astype(dtype).astype(np.float32), max(3, args.repeats // 3))
            rows.append({"spec": f"peer: ml_dtypes {dt} cast round trip ({spec})", "first_s": None,
                         "median_ms": t * 1e3, "gb_s": nbytes / t / 1e9, "ratio": t_copy / t,
                         "out_median_ms": None, "out_ratio": None})
    except ImportError:
        pass

    thp = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{args.threads} thread(s), backend {args.backend}, huge pages {'on' if thp else 'off'}")
    print(f"qdq-throughput: {args.size}x{args.size} fp32; {machine}")
    print("| spec | first call (s) | median (ms) | GB/s | ratio to copy | with out= (ms) | ratio, out= |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        first = "" if r["first_s"] is None else f"{r['first_s']:.2f}"
        o_ms = "" if r["out_median_ms"] is None else f"{r['out_median_ms']:.1f}"
        o_ratio = "" if r["out_ratio"] is None else f"{r['out_ratio']:.3f}"
        print(f"| {r['spec']} | {first} | {r['median_ms']:.1f} | {r['gb_s']:.2f} | {r['ratio']:.3f} | "
              f"{o_ms} | {o_ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
