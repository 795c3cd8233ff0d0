"""Streamed quantization (mixq.streaming) equals the in-memory path, resumes, and checks its budget.

Tiny random Llama (2 blocks, tied embeddings) from ``make_llama_folder``; calibration from its token
file. The peak-memory test of a larger synthetic model is in ``test_streaming_memory.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from mixq.cli import main
from mixq.model.lazy import LazyCheckpoint
from mixq.model.run_folder import load_quantized
from mixq.pipeline import quantize
from mixq.plan import LayerSpec, Options, Plan, PlanError
from mixq.plan.plan import Rule
from mixq.quant import QuantSpec
from mixq.stream_memory import MemoryBudgetError, parse_size
from mixq.stream_stage import MANIFEST, ResumeError, staging_folder
from mixq.streaming import StreamHooks, quantize_streamed

KW = {"samples": 8, "length": 32, "batch_size": 4}


@pytest.fixture(scope="module")
def root(tmp_path_factory, make_llama_folder):
    return make_llama_folder(tmp_path_factory.mktemp("stream"))


def plan_of(algorithm: str, keep: tuple[str, ...] = ("lm_head",), **spec) -> Plan:
    spec = LayerSpec(weights=QuantSpec.parse("int4:g32"), algorithm=algorithm, **spec)
    return Plan.uniform(spec, keep=keep)


def run(root, plan, name, streamed, **extra):
    fn = quantize_streamed if streamed else quantize
    return fn(str(root / "src"), plan, calib=str(root / "tokens.pt"), out=root / name, **KW, **extra)


def tensors(folder, file=None):
    if file is None:
        ck = LazyCheckpoint(folder)
        return ck.read(ck.names(), dtype=None)
    from safetensors.torch import load_file

    return load_file(str(folder / file)) if (folder / file).is_file() else {}


def assert_same_run(a, b) -> None:
    """Bitwise-equal weights, scales and activation ranges; same plan, config, report and logits."""
    for file in (None, "scales.safetensors", "quantizers.safetensors"):
        ta, tb = tensors(a.out, file), tensors(b.out, file)
        assert sorted(ta) == sorted(tb), file
        assert all(torch.equal(ta[k], tb[k]) for k in ta), file
    for file in ("plan.yaml", "config.json"):
        assert (a.out / file).read_text() == (b.out / file).read_text(), file
    fields = ("name", "algorithm", "loss", "rtn_loss", "error", "bits_per_weight", "notes")
    assert [[getattr(r, f) for f in fields] for r in a.report.layers] == \
        [[getattr(r, f) for f in fields] for r in b.report.layers]
    assert a.report.bits == b.report.bits
    ma, _ = load_quantized(a.out)
    mb, _ = load_quantized(b.out)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ma(x).logits, mb(x).logits)


def head_plan() -> Plan:
    """GPTQ everywhere, LM head included, with static int8 inputs (ranges to stage and restore)."""
    return plan_of("gptq", keep=(), inputs=QuantSpec.parse("int8"), static_inputs=True)


@pytest.fixture(scope="module")
def reference(root):
    """The in-memory run of :func:`head_plan`."""
    return run(root, head_plan(), "mem-gptq-head", streamed=False)


@pytest.mark.parametrize("algorithm,keep", [("rtn", ("lm_head",)), ("gptq", ("lm_head",))])
def test_streamed_equals_in_memory(root, algorithm, keep):
    tag = f"{algorithm}-{len(keep)}"
    a = run(root, plan_of(algorithm, keep), f"mem-{tag}", streamed=False)
    b = run(root, plan_of(algorithm, keep), f"str-{tag}", streamed=True)
    assert_same_run(a, b)
    index = json.loads((b.out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3  # one shard per block plus one for the rest
    assert "lm_head.weight" not in index  # still tied
    assert not staging_folder(b.out).exists()


def test_streamed_gptq_lm_head_from_final_hidden(root, reference):
    b = run(root, head_plan(), "str-gptq-head", streamed=True)
    assert_same_run(reference, b)
    assert "lm_head.inputs.hi" in tensors(b.out, "quantizers.safetensors")
    assert "lm_head.weight" in json.loads((b.out / "model.safetensors.index.json").read_text())["weight_map"]


def test_streamed_with_online_hadamard_static_inputs_and_kv(root):
    spec = {"inputs": QuantSpec.parse("int8"), "static_inputs": True, "kv": QuantSpec.parse("int8:token"),
            "options": Options(hadamard=-1)}
    plan = plan_of("gptq", **spec)
    b = run(root, plan, "str-had", streamed=True)
    assert_same_run(run(root, plan, "mem-had", streamed=False), b)
    ranges = tensors(b.out, "quantizers.safetensors")
    assert any(k.endswith("q_proj.inputs.hi") for k in ranges)
    assert all(torch.isfinite(v).all() for v in ranges.values())


def test_streamed_awq_and_smoothquant(root):
    spec = LayerSpec(weights=QuantSpec.parse("int4:g32"), algorithm="awq")
    smooth = LayerSpec(weights=QuantSpec.parse("int8:channel"), inputs=QuantSpec.parse("int8:token"),
                       options=Options(smooth_alpha=0.5))
    plan = Plan((Rule("lm_head", LayerSpec.keep()), Rule("*.mlp.*", smooth), Rule("*", spec)))
    assert_same_run(run(root, plan, "mem-awq", streamed=False), run(root, plan, "str-awq", streamed=True))


def interrupt(monkeypatch, method: str, after: int | None = None) -> None:
    """Make ``StreamHooks.<method>`` raise: ``leave_block`` once block ``after`` is staged,
    ``final_hidden`` before it stages anything."""
    original = getattr(StreamHooks, method)

    def failing(self, index, *args):
        if method == "final_hidden":
            raise KeyboardInterrupt("killed")
        original(self, index, *args)
        if index == after:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(StreamHooks, method, failing)


@pytest.mark.parametrize("method,after,done", [("leave_block", 0, 1), ("final_hidden", None, 2)])
def test_interrupted_run_resumes_to_the_same_result(root, reference, monkeypatch, method, after, done):
    plan = head_plan()
    out = root / f"resumed-{method}"
    with monkeypatch.context() as m:
        interrupt(m, method, after)
        with pytest.raises(KeyboardInterrupt):
            run(root, plan, out.name, streamed=True)
    stage = staging_folder(out)
    assert json.loads((stage / MANIFEST).read_text())["done"] == done
    assert not out.exists()
    messages = []
    b = run(root, plan, out.name, streamed=True, resume=True, status=messages.append)
    assert any(f"resuming after {done} of 2 blocks" in msg for msg in messages)
    assert_same_run(reference, b)
    assert not stage.exists()


def test_resume_with_another_plan_is_a_clear_error_and_a_fresh_run_works(root, monkeypatch):
    out = root / "mismatch"
    with monkeypatch.context() as m:
        interrupt(m, "leave_block", 0)
        with pytest.raises(KeyboardInterrupt):
            run(root, plan_of("gptq"), out.name, streamed=True)
    with pytest.raises(ResumeError, match="different plan"):
        run(root, plan_of("rtn"), out.name, streamed=True, resume=True)
    b = run(root, plan_of("rtn"), out.name, streamed=True)  # no resume: starts over
    assert b.out.is_dir() and not staging_folder(out).exists()


def test_too_small_budget_fails_before_reading_weights(root, monkeypatch):
    def no_reading(*_a, **_k):
        raise AssertionError("weights were read before the budget check")

    monkeypatch.setattr(LazyCheckpoint, "read", no_reading)
    with pytest.raises(MemoryBudgetError, match=r"at least \d+ MiB \(outside .*found --max-memory 0 MiB"):
        run(root, plan_of("gptq"), "small", streamed=True, max_memory=parse_size("100K"))
    assert not (root / "small").exists() and not staging_folder(root / "small").exists()


def test_parse_size():
    assert parse_size("300M") == 300 * 2**20
    assert parse_size("2G") == parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5g") == 3 * 2**29
    assert parse_size("512k") == parse_size("512KB") == 2**19
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="300M"):
        parse_size("lots")


def test_refusals_name_the_problem(root):
    with pytest.raises(PlanError, match="rotation"):
        run(root, plan_of("rtn"), "rot", streamed=True, rotate="hadamard")
    int4 = QuantSpec.parse("int4:g32")
    rtn_blocks_gptq_head = Plan((Rule("lm_head", LayerSpec(weights=int4, algorithm="gptq")),
                                 Rule("*", LayerSpec(weights=int4))))
    with pytest.raises(PlanError, match="LM head"):
        run(root, rtn_blocks_gptq_head, "head", streamed=True)


def test_cli_streamed_quantize(root, capsys):
    base = ["quantize", str(root / "src"), "--calib", str(root / "tokens.pt"), "--samples", "4",
            "--length", "32", "--spec", "int4:g32", "--algorithm", "gptq"]
    assert main([*base, "--max-memory", "1G", "--out", str(root / "cli"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["out"] == str(root / "cli")
    assert (root / "cli" / "model.safetensors.index.json").is_file()
    assert main([*base, "--max-memory", "10K", "--out", str(root / "cli-small")]) == 2
    assert "--max-memory" in capsys.readouterr().err
    assert main([*base, "--stream"]) == 2
    assert "--out" in capsys.readouterr().err
