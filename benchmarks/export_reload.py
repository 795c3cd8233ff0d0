"""Exports of full SmolLM2-135M: size on disk against the bits accounting, and reloads that must be exact.

Protocol: for each plan, quantize SmolLM2 with RTN (weights only unless the plan says otherwise), export
with ``mixq.export_pipeline.export`` (which itself reloads with mixq and requires identical logits),
then, for compressed-tensors folders, reload with plain ``transformers`` (``AutoModelForCausalLM.
from_pretrained``; the compressed-tensors package decompresses on load) and compare its logits on one
window of 128 fixed random token ids with the mixq model's. Sizes: the safetensors files on disk, their
headers, the packed parts of the quantized layers alone, and the accounting (``count_bits`` of the
plan plus every float tensor at its dtype).

    OMP_NUM_THREADS=1 python benchmarks/export_reload.py --out runs/export-bench \
        --json benchmarks/results/export-reload.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

PLANS = {
    "int4_g64": "version: 1\nrules:\n  - {pattern: lm_head, keep: true}\n  - {pattern: '*', weights: 'int4:g64'}\n",
    "fp8_w_a": "version: 1\nrules:\n  - {pattern: lm_head, keep: true}\n"
               "  - {pattern: '*', weights: 'fp8_e4m3:channel', inputs: 'fp8_e4m3:token'}\n",
    "mixed_int_fp8": "version: 1\nrules:\n  - {pattern: lm_head, keep: true}\n"
                     "  - {pattern: '*.mlp.down_proj', weights: 'int8:channel'}\n"
                     "  - {pattern: '*.mlp.*', weights: 'int4:g64'}\n"
                     "  - {pattern: '*.self_attn.o_proj', weights: 'fp8_e4m3:channel', inputs: 'fp8_e4m3:token'}\n"
                     "  - {pattern: 'model.layers.0.*', keep: true}\n"
                     "  - {pattern: '*', weights: 'int3:g64'}\n",
    "mixed_nvfp4_mxfp6": "version: 1\nrules:\n  - {pattern: lm_head, keep: true}\n"
                         "  - {pattern: '*.self_attn.*', weights: 'mxfp6_e2m3'}\n"
                         "  - {pattern: '*', weights: 'nvfp4'}\n",
}
WINDOW = 128


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def packed_part_bytes(folder: Path, layers: list[str]) -> int:
    """Bytes of the tensors stored under the quantized layers' weight names (packed codes and scales)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if any(key.startswith(f"{name}.weight") for name in layers):
                    t = f.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total


def run_plan(name: str, text: str, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from mixq.export_pipeline import export, exported_layers
    from mixq.plan import Plan
    from mixq.quant.accounting import bit_count

    plan_path = out / f"{name}.yaml"
    plan_path.write_text(text)
    t0 = time.perf_counter()
    src = exported_layers("smollm2", Plan.load(plan_path), quantize_kw={"calib": None})
    quantize_s = time.perf_counter() - t0
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    outcome = export(src, folder, format="auto")
    row = {"plan": text, **outcome.to_json(), "quantize_s": quantize_s}
    coded = [n for n, layer in src.layers.items() if layer.weight is not None]
    row["packed_parts_bytes"] = packed_part_bytes(folder, coded)
    row["packed_parts_accounted"] = sum(bit_count(layer.weight.spec, layer.weight.shape).bytes
                                        for layer in src.layers.values() if layer.weight is not None)
    ids = torch.randint(0, src.model.config.vocab_size, (1, WINDOW), generator=torch.Generator().manual_seed(0))
    ref = logits(src.model, ids)
    if outcome.format == "compressed-tensors":
        t1 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        row["transformers_load_s"] = time.perf_counter() - t1
        got = logits(hf, ids)
        row["transformers_equal"] = bool(torch.equal(got, ref))
        row["transformers_max_abs_diff"] = float((got - ref).abs().max())
        row["max_abs_logit"] = float(ref.abs().max())
        del hf
    t2 = time.perf_counter()
    import mixq

    again = mixq.load(folder)
    row["mixq_load_s"] = time.perf_counter() - t2
    row["mixq_equal"] = bool(torch.equal(logits(again, ids), ref))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/export-bench"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/export-reload.json"))
    parser.add_argument("--plans", default=",".join(PLANS), help="comma-separated subset of " + ",".join(PLANS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.plans.split(","):
        rows[name] = run_plan(name, PLANS[name], args.out)
        r = rows[name]
        print(f"{name}: {r['format']}, disk/accounting {r['size_ratio']:.5f} (payload {r['payload_ratio']:.5f}), "
              f"packed parts {r['packed_parts_bytes']}/{r['packed_parts_accounted']:.0f}, "
              f"transformers equal {r.get('transformers_equal')}, mixq equal {r['mixq_equal']}", file=sys.stderr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"protocol": "benchmarks/export_reload.py docstring", "window": WINDOW,
                                     "torch": torch.__version__, "results": rows}, indent=1, default=str) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
