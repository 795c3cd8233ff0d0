"""wiki-smollm2 side-by-side (../shared/BENCHMARKS.md): mixq's GPTQ against llm-compressor's, same run.

Scheme for both: int4 symmetric, one scale per group of 64 inputs, weights of every decoder-block
Linear; embeddings and the (tied) lm_head stay fp32. Calibration: the protocol's 64 windows of 512
tokens; perplexity on its 32 x 512 test windows. Each side runs in its own process:

- peer: ``benchmarks/peer_llmcompressor_gptq.py`` with llm-compressor's virtualenv (``--peer-python``);
  it times only its ``oneshot`` call and evaluates the model as llm-compressor leaves it in memory;
- mixq: ``mixq quantize smollm2 --spec int4:g64 --algorithm gptq --calib wiki --out DIR --json`` then
  ``mixq eval DIR --data wiki --json``;
- baseline: fp32 perplexity of the same model with mixq's protocol code (this venv).

Wall time is each tool's own measurement of its quantization step; peak RSS is reported twice: by the
tool itself and by this harness (``os.wait4`` rusage of that child alone, covering its whole life).
Every child gets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``, offline Hugging Face flags.
Results: ``OUT/ptq_vs_llmcompressor.json`` and ``.md``, each written atomically (tmp + rename).

    .venv/bin/python benchmarks/ptq_vs_llmcompressor.py [--threads 2] [--out runs/ptq_vs_llmcompressor]
        [--peer-python /tmp/peer-llmc/bin/python] [--only-peer | --only-mixq] [--no-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "peer_llmcompressor_gptq.py"
DEFAULT_PEER_PYTHON = "/tmp/peer-llmc/bin/python"
DEFAULT_MIXQ = str(Path(sys.executable).with_name("mixq"))


def child_env(threads: int) -> dict[str, str]:
    """The environment of every child: thread caps and offline Hugging Face flags."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


def run_child(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> dict:
    """Run ``cmd`` to completion; returns rc, wall_s, peak_rss_mb (wait4 rusage of this child), stdout.

    stdout is kept in memory (it is small: JSON); stderr goes to ``log``. On timeout the child's
    process group is killed and rc is the negative signal number.
    """
    import subprocess

    t0 = time.perf_counter()
    with open(log, "wb") as err, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen consistent
        wall = time.perf_counter() - t0
        out.seek(0)
        stdout = out.read().decode("utf-8", "replace")
    return {"cmd": cmd, "rc": proc.returncode, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "stdout": stdout, "log": str(log)}


def last_json(stdout: str) -> dict | None:
    """The last line of ``stdout`` that parses as a JSON object, or None."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    try:  # a pretty-printed object on its own
        obj = json.loads(stdout)
        return obj if isinstance(obj, dict) else None
    except json.JSONDecodeError:
        return None


def baseline_child() -> None:
    """(``--_baseline`` mode) print the fp32 perplexity of SmolLM2 on the protocol's test windows as JSON."""
    import torch

    from mixq.eval.corpus import eval_windows, wiki_split
    from mixq.eval.lm_metrics import perplexity
    from mixq.model.load import load_model, smollm2_path
    from transformers import AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = load_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)
    _, test = wiki_split(tokenizer)
    ppl = perplexity(model, eval_windows(test, 32, 512))
    print(json.dumps({"ppl": ppl.ppl, "nll": ppl.nll, "tokens": ppl.tokens, "eval_s": ppl.seconds}))


def machine(threads: int) -> dict:
    """The machine and its load when the run starts (shared machines are noisy: state it)."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "threads": threads, "loadavg_start": os.getloadavg(),
            "python": platform.python_version(), "platform": platform.platform()}


def run_peer(args: argparse.Namespace, model_dir: Path, out: Path) -> dict:
    cmd = [args.peer_python, str(PEER_SCRIPT), "--model", str(model_dir), "--threads", str(args.threads)]
    if args.peer_baseline:
        cmd.append("--baseline")
    r = run_child(cmd, child_env(args.threads), out / "peer.log", args.timeout)
    r["result"] = last_json(r["stdout"])
    return r


def run_mixq(args: argparse.Namespace, out: Path) -> dict:
    qdir = out / "mixq-int4-g64-gptq"
    env = child_env(args.threads)
    q = run_child([args.mixq, "quantize", "smollm2", "--spec", args.spec, "--algorithm", "gptq", "--calib",
                   "wiki", "--out", str(qdir), "--json"], env, out / "mixq-quantize.log", args.timeout)
    q["result"] = last_json(q["stdout"])
    r = {"quantize": q}
    if q["rc"] == 0:
        e = run_child([args.mixq, "eval", str(qdir), "--data", "wiki", "--json"], env, out / "mixq-eval.log",
                      args.timeout)
        e["result"] = last_json(e["stdout"])
        r["eval"] = e
    return r


def summarize(peer: dict | None, mixq: dict | None, base: dict | None) -> dict:
    """One row per tool: wall_s, self-reported and harness-measured peak RSS, ppl; and the ratios."""
    rows = {}
    if peer is not None:
        p = peer.get("result") or {}
        rows["llm-compressor"] = {"version": p.get("version"), "wall_s": p.get("wall_s"),
                                  "peak_rss_mb": p.get("peak_rss_mb"), "process_rss_mb": peer["peak_rss_mb"],
                                  "ppl": p.get("ppl"), "ok": peer["rc"] == 0 and "ppl" in p}
    if mixq is not None:
        q = mixq["quantize"].get("result") or {}
        e = (mixq.get("eval") or {}).get("result") or {}
        rows["mixq"] = {"version": q.get("version"), "wall_s": q.get("wall_s"),
                        "peak_rss_mb": q.get("peak_rss_mb"), "process_rss_mb": mixq["quantize"]["peak_rss_mb"],
                        "ppl": e.get("ppl"), "ok": mixq["quantize"]["rc"] == 0 and "ppl" in e}
    ratios = {}
    a, b = rows.get("llm-compressor"), rows.get("mixq")
    if a and b:
        for key in ("wall_s", "peak_rss_mb", "process_rss_mb"):
            if a.get(key) and b.get(key):
                ratios[f"{key} peer/mixq"] = a[key] / b[key]
    return {"rows": rows, "ratios": ratios, "ppl_fp32": (base or {}).get("ppl")}


def markdown(results: dict) -> str:
    """The results as a markdown table with the machine, commands and ratios."""
    s = results["summary"]
    m = results["machine"]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    lines = [f"# wiki-smollm2 GPTQ side-by-side: mixq vs llm-compressor ({results['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads per tool, load average at "
             f"start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])} (shared machine: times are noisy).",
             "Scheme: int4 symmetric, group 64, all decoder-block Linears; embeddings and tied lm_head fp32. "
             "Calibration 64 x 512 wiki windows (seed 0), perplexity on 32 x 512 test windows.", "",
             f"fp32 perplexity (mixq protocol code): {fmt(s['ppl_fp32'], '.3f')}", "",
             "| tool | version | quantize wall (s) | peak RSS, own (MB) | peak RSS, process (MB) | ppl | ppl / fp32 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for tool, r in s["rows"].items():
        rel = r["ppl"] / s["ppl_fp32"] if r.get("ppl") and s["ppl_fp32"] else None
        lines.append(f"| {tool} | {r['version'] or 'n/a'} | {fmt(r['wall_s'], '.1f')} | "
                     f"{fmt(r['peak_rss_mb'], '.0f')} | {fmt(r['process_rss_mb'], '.0f')} | {fmt(r['ppl'], '.3f')} "
                     f"| {fmt(rel, '.4f')} |")
    peer = (results.get("peer") or {}).get("result") or {}
    if peer:
        lines += ["", f"llm-compressor venv: llmcompressor {peer.get('version')}, compressed-tensors "
                  f"{peer.get('compressed_tensors')}, transformers {peer.get('transformers')}, torch "
                  f"{peer.get('torch')}; its own fp32 perplexity {fmt(peer.get('ppl_fp32'), '.3f')}; "
                  f"oneshot CPU time (s) {fmt(peer.get('cpu_s'), '.0f')}; GPTQ fell back to RTN on "
                  f"{len(peer.get('rtn_fallback_modules', []))} modules."]
    if s["ratios"]:
        lines += ["", "Ratios (llm-compressor / mixq): " + ", ".join(f"{k} {v:.2f}" for k, v in s["ratios"].items())]
    lines += ["", "'own' RSS is each tool's report (llm-compressor: ru_maxrss right after oneshot, i.e. load + "
              "calibration + quantization); 'process' RSS is the harness's wait4 rusage of the whole child "
              "(the peer child also evaluates perplexity).", "", "Commands:"]
    for name, cmd in results["commands"].items():
        lines.append(f"- {name}: `{' '.join(cmd)}`")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    if "--_baseline" in sys.argv:
        baseline_child()
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
    ap.add_argument("--mixq", default=DEFAULT_MIXQ, help="the mixq console script")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spec", default="int4:g64")
    ap.add_argument("--out", default="runs/ptq_vs_llmcompressor", help="results folder")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per child")
    ap.add_argument("--only-peer", action="store_true")
    ap.add_argument("--only-mixq", action="store_true")
    ap.add_argument("--no-baseline", action="store_true", help="skip the fp32 perplexity")
    ap.add_argument("--peer-baseline", action="store_true",
                    help="the peer also measures fp32 perplexity in its own venv (cross-check)")
    args = ap.parse_args()

    from mixq.model.load import smollm2_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(args.threads), "commands": {}}
    model_dir = smollm2_path()
    base = peer = mixq = None
    if not args.no_baseline:
        b = run_child([sys.executable, str(Path(__file__).resolve()), "--_baseline"], child_env(args.threads),
                      out / "baseline.log", args.timeout)
        b["result"] = last_json(b["stdout"])
        results["baseline"], base = b, b["result"]
        results["commands"]["fp32 baseline"] = b["cmd"]
    if not args.only_mixq:
        peer = run_peer(args, model_dir, out)
        results["peer"] = peer
        results["commands"]["llm-compressor"] = peer["cmd"]
    if not args.only_peer:
        mixq = run_mixq(args, out)
        results["mixq"] = mixq
        results["commands"]["mixq quantize"] = mixq["quantize"]["cmd"]
        if "eval" in mixq:
            results["commands"]["mixq eval"] = mixq["eval"]["cmd"]
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["summary"] = summarize(peer, mixq, base)
    write_atomic(out / "ptq_vs_llmcompressor.json", json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    write_atomic(out / "ptq_vs_llmcompressor.md", md)
    print(md)
    failed = [c for c in (peer, (mixq or {}).get("quantize"), (mixq or {}).get("eval")) if c and c["rc"] != 0]
    for c in failed:
        print(f"failed (rc {c['rc']}): {' '.join(c['cmd'])}; see {c['log']}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
