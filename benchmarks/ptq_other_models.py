"""The PTQ pipeline beyond one architecture: MiniLM (an encoder) and EfficientNet-Lite0 (a CNN).

MiniLM rows run ``mixq quantize minilm ... --eval --json`` (calibration: 64 wiki windows of 128
tokens; metric: cosine similarity and relative MSE of mean-pooled sentence embeddings against fp32
on 512 wiki sentences). EfficientNet-Lite0 rows use the Python API: calibration on 64 augmented crops
of the photos that ship with matplotlib, agreement (top-1 and KL against fp32) on 256 other crops
(no labelled ImageNet data is available offline).

    python benchmarks/ptq_other_models.py [--only minilm|efficientnet] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MINILM_ROWS = {
    f"{spec} {alg}": ["--spec", spec, "--algorithm", alg]
    for spec in ("int4:g64", "int3:g64", "int4:channel") for alg in ("rtn", "gptq", "awq")
}
MINILM_ROWS |= {f"{spec} {alg}": ["--spec", spec, "--algorithm", alg]
                for spec in ("mxfp4", "nvfp4") for alg in ("rtn", "gptq")}
MINILM_ROWS["W8A8 int8 token"] = ["--spec", "int8:channel", "--inputs", "int8:token"]
MINILM_ROWS["W8A8 fp8"] = ["--spec", "fp8_e4m3:channel", "--inputs", "fp8_e4m3:token"]
# CNN layers have input widths (3*3*3 = 27, 16, 24, 40, ...) that groups of 32/64 do not divide:
# per-channel specs only; depthwise convs fall back to RTN (noted by the plan).
CNN_SPECS = ("int8:channel", "int4:channel", "fp8_e4m3:channel", "int4:channel:mse")


def save(path: Path, rows: dict) -> None:
    from mixq.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(rows, indent=1) + "\n")


def minilm(out_rows: dict, threads: int, rows: list[str] | None, path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name, extra in MINILM_ROWS.items():
        if rows and name not in rows:
            continue
        cmd = [sys.executable, "-m", "mixq", "quantize", "minilm", *extra, "--length", "128", "--eval", "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            row = {"name": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            d = json.loads(proc.stdout)
            row = {"name": name, "cosine": d["eval"]["cosine"], "rel_mse": d["eval"]["rel_mse"],
                   "bits": d["bits"]["quantized_bits_per_weight"], "quantize_s": d["wall_s"],
                   "peak_rss_mb": d["peak_rss_mb"]}
        out_rows[f"minilm {name}"] = row
        save(path, out_rows)
        print(json.dumps(row), flush=True)


def efficientnet(out_rows: dict, specs: list[str] | None, path: Path) -> None:
    from mixq.algorithms.runner import quantize_model
    from mixq.eval.vision import sample_images, top1_agreement
    from mixq.model.vision import load_efficientnet_lite0
    from mixq.plan import LayerSpec, Plan
    from mixq.quant import QuantSpec

    reference = load_efficientnet_lite0()
    calib = sample_images(64, seed=0)
    test = sample_images(256, seed=1)
    for spec in [s for s in CNN_SPECS if not specs or s in specs]:
        for alg in ("rtn", "gptq"):
            model = copy.deepcopy(reference)
            plan = Plan.uniform(LayerSpec(weights=QuantSpec.parse(spec), algorithm=alg), keep=())
            t0 = time.perf_counter()
            report = quantize_model(model, plan, calib, batch_size=16)
            seconds = time.perf_counter() - t0
            agree = top1_agreement(model, reference, test)
            row = {"name": f"{spec} {alg}", "top1": agree.top1, "kl": agree.kl,
                   "bits": report.bits["quantized_bits_per_weight"], "quantize_s": seconds,
                   "rtn_fallback_layers": sum(1 for r in report.layers if r.algorithm != alg)}
            out_rows[f"efficientnet {spec} {alg}"] = row
            save(path, out_rows)
            print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("minilm", "efficientnet"), default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="*", default=None, help="MiniLM row names / CNN specs to run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    path = args.out / "ptq-other-models.json"
    rows: dict = json.loads(path.read_text()) if path.is_file() else {}
    if args.only in (None, "minilm"):
        minilm(rows, args.threads, args.rows, path)
    if args.only in (None, "efficientnet"):
        import torch

        torch.set_num_threads(args.threads)
        efficientnet(rows, args.rows, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
