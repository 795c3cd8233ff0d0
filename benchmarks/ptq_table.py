"""The PTQ results table: SmolLM2 on the wiki-smollm2 protocol, one subprocess per scheme.

Each row runs ``mixq quantize smollm2 ... --eval --json`` in a fresh process (so its peak RSS is its
own), which quantizes with the protocol's calibration (64 x 512 tokens, seed 0) and then measures
perplexity on the 32 x 512 test windows and KL / top-1 agreement against the fp32 model on the
first 8 of them (``--kl-windows``). The fp32
row is ``mixq eval smollm2``. Embeddings and the tied LM head stay in full precision in every row.

    python benchmarks/ptq_table.py [--only NAME ...] [--threads 1] [--tag -a] [--out benchmarks/results]

Writes ``ptq-smollm2.json`` and ``ptq-smollm2.md`` (atomically) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MIXQ = [sys.executable, "-m", "mixq"]

W4 = {"int4:g64": "int4:g64", "int3:g64": "int3:g64", "int4:channel": "int4:channel"}
ROWS: dict[str, list[str]] = {}
for _alg in ("rtn", "gptq", "awq"):
    for _label, _spec in W4.items():
        ROWS[f"{_label} {_alg}"] = ["--spec", _spec, "--algorithm", _alg]
for _spec in ("int4:g64:mse", "int4:channel:mse"):
    for _alg in ("rtn", "gptq"):
        ROWS[f"{_spec} {_alg}"] = ["--spec", _spec, "--algorithm", _alg]
ROWS["int4:g64 gptq static-groups"] = ["--spec", "int4:g64", "--algorithm", "gptq", "--static-groups"]
for _spec in ("mxfp4", "nvfp4"):
    for _alg in ("rtn", "gptq"):
        ROWS[f"{_spec} {_alg}"] = ["--spec", _spec, "--algorithm", _alg]
        ROWS[f"{_spec} {_alg} +block-hadamard"] = ["--spec", _spec, "--algorithm", _alg, "--hadamard", "auto"]
ROWS["W8A8 int8 smoothquant"] = ["--spec", "int8:channel", "--inputs", "int8:token", "--smooth", "0.5"]
ROWS["W8A8 fp8"] = ["--spec", "fp8_e4m3:channel", "--inputs", "fp8_e4m3:token"]
ROWS["KV int8"] = ["--kv-only", "--kv", "int8:g64"]
ROWS["KV fp8"] = ["--kv-only", "--kv", "fp8_e4m3:g64"]


def run(cmd: list[str], env: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "process_s": wall}
    return {**json.loads(proc.stdout), "process_s": wall}


def row_of(name: str, result: dict) -> dict:
    if "error" in result:
        return {"name": name, "error": result["error"]}
    ev = result.get("eval", result)
    bits = result.get("bits", {})
    return {"name": name, "ppl": ev.get("ppl"), "kl": ev.get("kl"), "top1": ev.get("top1"),
            "bits": bits.get("quantized_bits_per_weight"), "bits_all": bits.get("bits_per_weight"),
            "quantize_s": result.get("wall_s"), "quantize_cpu_s": result.get("cpu_s"), "peak_rss_mb": result.get("peak_rss_mb"),
            "process_s": result.get("process_s")}


def markdown(rows: list[dict], meta: dict) -> str:
    def f(v: object, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    out = [f"SmolLM2-135M, wiki-smollm2 protocol; {meta['threads']} threads on {meta['machine']}; "
           f"{meta['date']}.", "",
           "| scheme | ppl | KL to fp32 (8 windows) | top-1 agree | bits/w (quantized) | bits/w (all linears) | "
           "quantize s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | error: {r['error']} | | | | | | |")
            continue
        out.append(f"| {r['name']} | {f(r['ppl'], '.3f')} | {f(r['kl'], '.4f')} | {f(r['top1'], '.3f')} | "
                   f"{f(r['bits'] or None, '.3f')} | {f(r['bits_all'], '.3f')} | {f(r['quantize_s'], '.1f')} | "
                   f"{f(r['peak_rss_mb'], '.0f')} |")
    return "\n".join(out) + "\n"


def merge(out: Path, model: str) -> None:
    """Combine the row files of parallel runs (``ptq-MODEL*.json``) into ``ptq-MODEL.json`` and ``.md``."""
    from mixq.fileio import atomic_write_text

    rows: dict[str, dict] = {}
    meta: dict = {}
    for path in sorted(out.glob(f"ptq-{model}*.json")):
        data = json.loads(path.read_text())
        meta = {**data["meta"], **meta, "commands": {**meta.get("commands", {}), **data["meta"]["commands"]}}
        rows.update({r["name"]: r for r in data["rows"]})
    ordered = [rows[n] for n in ["fp32", *ROWS] if n in rows]
    atomic_write_text(out / f"ptq-{model}.json", json.dumps({"meta": meta, "rows": ordered}, indent=1) + "\n")
    atomic_write_text(out / f"ptq-{model}.md", markdown(ordered, meta))
    print(markdown(ordered, meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="row names (substring match) to run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--kl-windows", type=int, default=8, help="test windows for KL / top-1 (ppl: all 32)")
    parser.add_argument("--tag", default="", help="suffix of the result files (for runs in parallel)")
    parser.add_argument("--reverse", action="store_true", help="run the selected rows last to first")
    parser.add_argument("--merge", action="store_true", help="only merge ptq-MODEL*.json files into ptq-MODEL.md")
    args = parser.parse_args()
    if args.merge:
        merge(args.out, args.model)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    names = ["fp32", *ROWS]
    if args.only:
        names = [n for n in names if any(o in n for o in args.only)]
    if args.reverse:
        names.reverse()
    path = args.out / f"ptq-{args.model}{args.tag}.json"
    previous = {r["name"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    for name in names:
        if name == "fp32":
            cmd = [*MIXQ, "eval", args.model, "--no-reference", "--json"]
        else:
            cmd = [*MIXQ, "quantize", args.model, *ROWS[name], "--eval", "--kl-windows", str(args.kl_windows),
                   "--json"]
        row = row_of(name, run(cmd, env))
        previous[name] = row
        print(json.dumps(row), flush=True)
        meta = {"threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"), "commands": {n: ROWS.get(n, ["eval"]) for n in previous}}
        ordered = [previous[n] for n in ["fp32", *ROWS] if n in previous]
        from mixq.fileio import atomic_write_text

        atomic_write_text(path, json.dumps({"meta": meta, "rows": ordered}, indent=1) + "\n")
        atomic_write_text(path.with_suffix(".md"), markdown(ordered, meta))
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
