"""Packed CPU inference on SmolLM2-135M: prefill and decode tokens/s, fp32 vs packed W8A8 / W8A7 / int4.

Protocol (../shared/BENCHMARKS.md: one run, same process, baseline measured alongside, ratios):

- Model: the full SmolLM2-135M-Instruct (``load_model("smollm2")``, fp32, 30 blocks). Inputs: one
  sequence of ``--prefill`` random token ids (seed 0; the speed does not depend on the text).
- Variants, each built by mixq from the same fp32 model with RTN (LM head and embeddings kept in fp32,
  ``Plan.uniform``'s default): ``fp32`` (the model itself); ``w8a8`` (int8:channel weights, int8:token
  inputs, ``PackedLinearW8A8`` with backend ``auto``, which routes 8-bit inputs to ``fp32_exact``: int32
  accumulators computed exactly by fp32 BLAS on K-chunks); ``w8a7`` (int8:channel weights, int7:token
  inputs, ``auto`` -> oneDNN u8 x s8 for every row count, the weight held only as oneDNN's prepacked
  copy); ``w7a8`` (int7:channel weights, int8:token inputs: also exact in oneDNN, since 8-bit
  activations times 7-bit weights keep its int16 pair sums below 32767); ``int4_g64`` (int4:g64 weight-only, ``PackedLinearWeightOnly``: fused numba
  unpack+dot for decode, tiles + BLAS for prefill). ``--int-mm`` adds ``w8a8_int_mm`` (``torch._int_mm``,
  ~0.05x fp32 on CPUs without VNNI).
- Quality (labelled ``quality`` in the JSON): fake-quant and packed RTN W8A8, W7A8 and W8A7 against fp32 on ``--quality-windows`` windows of ``--quality-len`` tokens
  from the start of the wiki-smollm2 test split: mean KL(fp32 || model), top-1 agreement and perplexity
  (``mixq.eval.lm_metrics.score``). A cheap indication, not the wiki-smollm2 protocol (32 x 512).
- Per repeat, the variants run in turn (alternating, so load drifts hit all of them): prefill =
  one forward over the prompt with the KV cache on and the LM head applied to the last position only
  (``logits_to_keep=1``, as transformers' ``generate`` does; the same for every variant); decode = ``--decode`` greedy steps of one token
  reusing that cache. Reported: median tokens/s over ``--repeats`` and the ratio to fp32's median.
- Bytes: ``packed_bytes`` of each model (every parameter and buffer, tied storage once) and, for the
  quantized linears alone, the bytes the packed modules hold against ``bit_count`` accounting.
- Sanity: max |logit difference| and argmax agreement on the first 64 prompt tokens of each packed
  model against its fake-quant model, and of both against fp32 (to put the first in proportion).

    python benchmarks/packed_inference.py [--threads 2] [--prefill 256] [--decode 32] [--repeats 3]
        [--layers N] [--quality-windows 2] [--quality-len 256] [--int-mm]
        [--json benchmarks/results/packed-inference.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from mixq.algorithms.runner import quantize_model
from mixq.export.layers import quantized_layers
from mixq.eval.corpus import wiki_split
from mixq.eval.lm_metrics import score
from mixq.model.load import load_model
from mixq.model.load import resolve as resolve_model
from mixq.model.packed import pack_model, packed_bytes
from mixq.model.plan_match import count_bits, resolve
from mixq.plan import LayerSpec, Plan
from mixq.quant import QuantSpec
from mixq.quant.accounting import bit_count
from mixq.runtime.linear import PackedLinearW8A8, PackedLinearWeightOnly

W8A8 = LayerSpec(weights=QuantSpec.parse("int8:channel"), inputs=QuantSpec.parse("int8:token"))
W8A7 = LayerSpec(weights=QuantSpec.parse("int8:channel"), inputs=QuantSpec.parse("int7:token"))
W7A8 = LayerSpec(weights=QuantSpec.parse("int7:channel"), inputs=QuantSpec.parse("int8:token"))
SCHEMES = {  # scheme -> (plan spec, {variant label: pack_model keyword arguments})
    "w8a8": (W8A8, {"w8a8": {"w8a8_backend": "auto"}}),
    "w7a8": (W7A8, {"w7a8": {"w8a8_backend": "auto"}}),
    "w8a7": (W8A7, {"w8a7": {"w8a8_backend": "auto"}}),
    "int4_g64": (LayerSpec(weights=QuantSpec.parse("int4:g64")), {"int4_g64": {}}),
}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unavailable"


def cache_kwarg(model: torch.nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def last_logits_kwarg(model: torch.nn.Module) -> dict:
    """``{"logits_to_keep": 1}`` where the model takes it: generation needs the last position's logits
    only, so prefill skips the LM head for the others (what transformers' ``generate`` does)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def timed_generation(model: torch.nn.Module, ids: torch.Tensor, decode: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one prompt ``ids [1, T]`` and ``decode`` greedy steps."""
    key = cache_kwarg(model)
    last = last_logits_kwarg(model)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **last)
    t1 = time.perf_counter()
    cache, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
    for _ in range(decode):
        out = model(input_ids=token, use_cache=True, **{key: cache})
        cache, token = getattr(out, key), out.logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def linear_accounting(model: torch.nn.Module, layers: dict) -> dict:
    """Bytes the packed linears hold vs ``bit_count`` of their specs (codes + scales + zero points)."""
    held = tables = 0
    for m in model.modules():
        if isinstance(m, PackedLinearW8A8):  # plain int8 codes and/or oneDNN's prepacked copy
            codes = m.weight_codes.numel() if m.weight_codes is not None else 0
            held += codes + m.opaque_bytes() + m.weight_scale.numel() * 4
        elif isinstance(m, PackedLinearWeightOnly):
            held += m.packed.numel() + m.scale.numel() * 4
            held += sum(t.numel() * 4 for t in (m.zero, m.offset) if t is not None)
            tables += m.lut.numel() * 4 + (m.byte_lut.numel() * 4 if m.byte_lut is not None else 0)
    coded = [l.weight for l in layers.values() if l.weight is not None]
    expected = sum(bit_count(w.spec, w.shape).bytes for w in coded)
    params = sum(w.codes.numel() for w in coded)
    return {"packed_linear_bytes": held, "bit_count_bytes": expected, "lookup_table_bytes": tables,
            "quantized_params": params, "fp32_bytes_of_those_weights": params * 4,
            "bits_per_weight_held": 8 * held / params if params else 0.0}


def agreement(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of positions where the two logits ``[B, T, V]`` pick the same token."""
    return float((got.argmax(-1) == ref.argmax(-1)).float().mean())


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max |logit difference|, max |logit| of ``ref`` and argmax agreement of two ``[B, T, V]`` logits."""
    return {"max_abs_logit_diff": float((got - ref).abs().max()), "max_abs_logit": float(ref.abs().max()),
            "argmax_agreement": agreement(got, ref)}


def routes(model: torch.nn.Module) -> dict:
    """W8A8 modules' backends for a 256-row prefill and a 1-row decode step, as counts."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, PackedLinearW8A8):
            key = f"prefill {m.route(256)} / decode {m.route(1)}"
            out[key] = out.get(key, 0) + 1
    return out


def build(base: torch.nn.Module, spec: LayerSpec, packings: dict, check_ids: torch.Tensor,
          quality: dict | None = None) -> dict:
    """Quantize a copy of ``base`` (RTN) and pack it once per entry of ``packings`` (label -> pack_model
    keyword arguments); returns the packed variants and their facts. ``quality``: ``{"windows", "name",
    "out"}`` to score the fake-quant model (and the first packed one) against fp32 into ``out``."""
    fq = copy.deepcopy(base)
    resolved = resolve(Plan.uniform(spec), fq)
    t0 = time.perf_counter()
    report = quantize_model(fq, resolved)
    layers = quantized_layers(fq, resolved, report.scales)
    quant_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = fq(input_ids=check_ids).logits
        fp32 = base(input_ids=check_ids).logits
    plan = str(spec.weights) + (f" @ {spec.inputs}" if spec.inputs else "")
    if quality is not None:
        quality["out"][f"{quality['name']}_fake_quant"] = {"plan": plan, **agreement_facts(fq, base, quality)}
    out = {}
    for i, (label, kwargs) in enumerate(packings.items()):
        model = copy.deepcopy(fq)
        t0 = time.perf_counter()
        kinds = pack_model(model, layers, **kwargs)
        pack_s = time.perf_counter() - t0
        with torch.no_grad():
            got = model(input_ids=check_ids).logits
        if quality is not None and i == 0:
            quality["out"][f"{label}_packed"] = {"plan": plan, **kwargs, **agreement_facts(model, base, quality)}
        out[label] = {"model": model, "facts": {
            "plan": plan, "pack_kwargs": kwargs, "w8a8_routes": routes(model),
            "packed_layers": len(kinds), "kinds": sorted(set(kinds.values())),
            "quantize_s": round(quant_s, 2), "pack_s": round(pack_s, 2),
            "bits": count_bits(resolved), "bytes": packed_bytes(model), **linear_accounting(model, layers),
            "check_vs_fake_quant": compare(got, ref), "packed_vs_fp32": compare(got, fp32),
            "fake_quant_vs_fp32": compare(ref, fp32),
        }}
    del fq, layers
    gc.collect()
    return out


def agreement_facts(model: torch.nn.Module, base: torch.nn.Module, quality: dict) -> dict:
    """KL(fp32 || model), top-1 agreement and perplexity of ``model`` on the quality windows."""
    ppl, agree = score(model, quality["windows"], base)
    return {"kl_to_fp32": agree.kl, "top1_agreement_with_fp32": agree.top1, "ppl": ppl.ppl,
            "tokens": agree.tokens}


def quality_windows(n: int, length: int) -> torch.Tensor:
    """``[n, length]`` token windows from the start of the wiki-smollm2 test split."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"), local_files_only=True)
    _, test = wiki_split(tokenizer)
    return test[: n * length].reshape(n, length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=0, 
                    help="keep only the first N blocks (0: all; for smoke tests)")
    ap.add_argument("--quality-windows", type=int, default=2)
    ap.add_argument("--quality-len", type=int, default=256)
    ap.add_argument("--int-mm", action="store_true", help="also time W8A8 on torch._int_mm (slow)")
    ap.add_argument("--json", default="benchmarks/results/packed-inference.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = uptime()
    base = load_model("smollm2")
    if args.layers:
        base.model.layers = base.model.layers[: args.layers]
        base.config.num_hidden_layers = args.layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, args.prefill), generator=gen)  # [1, T]
    fp32_facts = {"plan": "fp32 (no quantization)", "bytes": packed_bytes(base)}
    variants = {"fp32": {"model": base, "facts": fp32_facts}}
    windows = quality_windows(args.quality_windows, args.quality_len)
    quality_out: dict[str, dict] = {"fp32": {"plan": "fp32", "kl_to_fp32": 0.0, "top1_agreement_with_fp32": 1.0,
                                             "ppl": score(base, windows)[0].ppl, "tokens": 0}}
    for name, (spec, packings) in SCHEMES.items():
        if name == "w8a8" and args.int_mm:
            packings = {**packings, "w8a8_int_mm": {"w8a8_backend": "int_mm"}}
        quality = {"windows": windows, "name": name, "out": quality_out} if name != "int4_g64" else None
        variants.update(build(base, spec, packings, ids[:, :64], quality))
    torch.set_num_threads(args.threads)  # numba's first launch may have reset torch's pool
    for v in variants.values():  # warm-up (numba compilation / cache load, allocator)
        timed_generation(v["model"], ids[:, :16], 2)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, v in variants.items():
            times[name].append(timed_generation(v["model"], ids, args.decode))
    load_after = uptime()
    results = {}
    for name, v in variants.items():
        pre = statistics.median(t[0] for t in times[name])
        dec = statistics.median(t[1] for t in times[name])
        results[name] = {**v["facts"], "prefill_s": pre, "decode_s": dec,
                         "prefill_tok_s": args.prefill / pre, "decode_tok_s": args.decode / dec,
                         "all_prefill_s": [t[0] for t in times[name]],
                         "all_decode_s": [t[1] for t in times[name]]}
    fp = results["fp32"]
    for r in results.values():
        r["prefill_ratio_to_fp32"] = r["prefill_tok_s"] / fp["prefill_tok_s"]
        r["decode_ratio_to_fp32"] = r["decode_tok_s"] / fp["decode_tok_s"]
        r["bytes_ratio_to_fp32"] = r["bytes"] / fp["bytes"]
    doc = {
        "protocol": "packed-inference (benchmarks/packed_inference.py docstring)",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": args.threads, "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "uptime_before": load_before, "uptime_after": load_after},
        "settings": {"prefill_tokens": args.prefill, "decode_tokens": args.decode, "repeats": args.repeats,
                     "blocks": base.config.num_hidden_layers},
        "results": results,
        "quality": {"what": "W8A8 vs W7A8 vs W8A7 (per-channel weights, per-token inputs, RTN): fake-quant "
                            "and packed models against fp32, mean KL(fp32 || model) in nats and top-1 agreement",
                    "windows": f"{args.quality_windows} x {args.quality_len} tokens from the start of the "
                               "wiki-smollm2 test split", **quality_out},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"threads {args.threads}, prefill {args.prefill} tokens, decode {args.decode} tokens, "
          f"{args.repeats} repeats; load before: {load_before}; after: {load_after}\n")
    print("| variant | prefill tok/s | ratio | decode tok/s | ratio | model MB "
          "| linears: held B / bit_count B | max abs dlogit vs fake-quant | argmax agreement: packed vs fq, "
          "fq vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        has = "packed_linear_bytes" in r
        acc = f"{r['packed_linear_bytes']} / {r['bit_count_bytes']:.0f}" if has else "-"
        chk = f"{r['check_vs_fake_quant']['max_abs_logit_diff']:.2e}" if has else "-"
        agree = (f"{r['check_vs_fake_quant']['argmax_agreement']:.3f}, "
                 f"{r['fake_quant_vs_fp32']['argmax_agreement']:.3f}") if has else "-"
        print(f"| {name} | {r['prefill_tok_s']:.1f} | {r['prefill_ratio_to_fp32']:.2f} | "
              f"{r['decode_tok_s']:.1f} | {r['decode_ratio_to_fp32']:.2f} | {r['bytes'] / 1e6:.1f} | "
              f"{acc} | {chk} | {agree} |")
    print("\n| quality (vs fp32) | KL | top-1 | ppl |\n|---|---|---|---|")
    for name, q in quality_out.items():
        print(f"| {name} ({q['plan']}) | {q['kl_to_fp32']:.5f} | {q['top1_agreement_with_fp32']:.4f} | {q['ppl']:.3f} |")


if __name__ == "__main__":
    main()
