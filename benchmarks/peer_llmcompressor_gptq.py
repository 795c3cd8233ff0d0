"""Peer side of the wiki-smollm2 GPTQ side-by-side: llm-compressor's GPTQModifier on the CPU.

Runs INSIDE llm-compressor's own virtualenv, which also holds mixq (``pip install --no-deps -e``) for
the protocol code only (token stream, split, calibration and test windows, perplexity):

    python3 -m venv /tmp/peer-llmc
    /tmp/peer-llmc/bin/pip install torch==2.13.0
    /tmp/peer-llmc/bin/pip install llmcompressor gguf sentencepiece
    /tmp/peer-llmc/bin/pip install --no-deps -e .
    /tmp/peer-llmc/bin/python benchmarks/peer_llmcompressor_gptq.py --model ~/.cache/mixq/SmolLM2-135M-Instruct.Q4_1-fp32

Scheme: W4A16, int4 symmetric, one fp32 scale per group of 64 inputs (strategy "group"; the W4A16
preset's group of 128 does not divide SmolLM2's hidden size 576), no activation ordering, GPTQ block
128, dampening 0.01, llm-compressor's default weight observer (memoryless min-max). Targets: every
Linear except ``lm_head`` (tied to the embeddings, both stay fp32). Calibration: the protocol's 64
windows of 512 tokens as a pre-tokenized ``datasets.Dataset``, batch 1, unshuffled.

Only the ``oneshot`` call is timed. Perplexity is then measured on the protocol's 32 x 512 test
windows with the model as llm-compressor leaves it in memory (frozen quantization status: each
Linear's forward fake-quantizes its weight with the computed scales; GPTQ has also written the
quantize-dequantized weights into ``weight``). The script checks that the weights changed and lie
on the int4 grid of their scales before measuring. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB (from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def recipe(group_size: int, block_size: int, damp: float):
    """The GPTQModifier for int4 symmetric per-group weights, every Linear but lm_head."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": group_size, "dynamic": False, "actorder": None}
    return GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights,
                                   "input_activations": None, "output_activations": None}},
        ignore=["lm_head"], actorder=None, block_size=block_size, dampening_frac=damp)


def calibration_dataset(windows: torch.Tensor):
    """A datasets.Dataset of {"input_ids", "attention_mask"} rows from int64 windows [n, length]."""
    from datasets import Dataset

    ids = windows.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})


def check_quantized(model: torch.nn.Module, reference: dict[str, torch.Tensor], bits: int) -> dict:
    """Check each quantized Linear: weight changed vs fp32 and W / scale is an integer in range.

    Returns counts and the worst deviations; raises RuntimeError when nothing was quantized.
    """
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    n_quant = n_changed = 0
    worst_grid = worst_range = 0.0
    skipped = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        scale = getattr(mod, "weight_scale", None)
        if scale is None:
            skipped.append(name)
            continue
        n_quant += 1
        W = mod.weight.detach().float()
        S = scale.detach().float()  # [out, in / group]
        g = W.shape[1] // S.shape[1]
        Q = W / S.repeat_interleave(g, dim=1)
        worst_grid = max(worst_grid, (Q - Q.round()).abs().max().item())
        worst_range = max(worst_range, (Q.round().clamp(qmin, qmax) - Q.round()).abs().max().item())
        n_changed += int(not torch.equal(W, reference[name]))
    if n_quant == 0:
        raise RuntimeError("expected llm-compressor to leave weight_scale on the Linears, found none")
    return {"quantized_linears": n_quant, "changed_vs_fp32": n_changed, "kept_fp32": skipped,
            "max_offgrid": worst_grid, "max_out_of_range": worst_range}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="fp32 Hugging Face folder of SmolLM2 (mixq's cache)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--baseline", action="store_true", help="also measure the fp32 perplexity first")
    ap.add_argument("--layers", type=int, default=None, help="smoke test: keep only the first N blocks")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixq.eval.corpus import calibration_windows, eval_windows, wiki_split
    from mixq.eval.lm_metrics import perplexity

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).eval()
    if args.layers is not None:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    pool, test = wiki_split(tokenizer)
    calib = calibration_windows(pool, args.n_calib, args.seq_len, 0)
    test_windows = eval_windows(test, args.n_eval, args.seq_len)
    result: dict = {"tool": "llm-compressor GPTQModifier", "version": llmcompressor.__version__,
                    "compressed_tensors": compressed_tensors.__version__,
                    "transformers": transformers.__version__, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
                    "scheme": f"int4 sym, group {args.group_size}, actorder none, block {args.block_size}, "
                              f"damp {args.damp}, lm_head + embeddings fp32",
                    "calib": list(calib.shape), "eval": list(test_windows.shape),
                    "layers": len(model.model.layers)}
    if args.baseline:
        result["ppl_fp32"] = perplexity(model, test_windows).ppl
    reference = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear)}
    dataset = calibration_dataset(calib)
    modifier = recipe(args.group_size, args.block_size, args.damp)
    result["rss_before_quant_mb"] = current_rss_mb()

    t0, cpu0 = time.perf_counter(), time.process_time()
    model = oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifier,
                    num_calibration_samples=args.n_calib, max_seq_length=args.seq_len, batch_size=1,
                    shuffle_calibration_samples=False)
    result["wall_s"] = time.perf_counter() - t0
    result["cpu_s"] = time.process_time() - cpu0  # all threads, user + system: less sensitive to load
    result["cpu_s"] = time.process_time() - cpu0
    result["peak_rss_mb"] = peak_rss_mb()  # load + data + calibration + quantization
    result["rtn_fallback_modules"] = list(getattr(modifier, "_rtn_fallback_module_names", []))

    model.eval()
    result["check"] = check_quantized(model, reference, 4)
    del reference
    ppl = perplexity(model, test_windows)
    result["ppl"] = ppl.ppl
    result["eval_s"] = ppl.seconds
    result["peak_rss_total_mb"] = peak_rss_mb()  # including the perplexity pass
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
