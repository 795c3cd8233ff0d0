"""Streamed and data-parallel at once: ``quantize_streamed`` on 2 gloo ranks equals one in-memory process.

One 2-process run (``run_local``, spawned once per module) on the tiny random Llama does, with GPTQ
on every layer including the LM head (static int8 inputs, so observer ranges are reduced and the
head is calibrated from the staged last-block outputs):

- an uninterrupted run;
- a run killed after block 0 is staged, then resumed (every rank's block-1 inputs come back from
  rank 0's staging folder);
- a run killed after the last block's outputs are staged, then resumed (every rank's final outputs
  come back);
- a resume with another plan: a ResumeError on both ranks, not a hang;

and rank 1 records, through an audit hook, every file it creates, renames or removes under the
test folder: none. The parent compares each run folder bit for bit with ``pipeline.quantize`` in one
process, and checks that a 2-rank staging folder refuses a 1-process resume.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mixq.dist import Comm, run_local
from mixq.model.lazy import LazyCheckpoint
from mixq.model.run_folder import load_quantized
from mixq.pipeline import quantize
from mixq.plan import LayerSpec, Plan
from mixq.quant import QuantSpec
from mixq.stream_stage import MANIFEST, ResumeError, staging_folder
from mixq.streaming import StreamHooks, quantize_streamed

KW = {"samples": 8, "length": 32, "batch_size": 2}  # 2 batches per rank
WRITES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink", "shutil.rmtree",
          "os.truncate"}


def head_plan(algorithm: str = "gptq") -> Plan:
    """``algorithm`` int4:g32 on every layer, LM head included, with static int8 inputs."""
    return Plan.uniform(LayerSpec(weights=QuantSpec.parse("int4:g32"), algorithm=algorithm,
                                  inputs=QuantSpec.parse("int8"), static_inputs=True), keep=())


class Killed(Exception):
    """The simulated interruption of a rank."""


def streamed(folder: Path, name: str, plan: Plan | None = None, **extra: Any) -> Any:
    return quantize_streamed(str(folder / "src"), plan or head_plan(), calib=str(folder / "tokens.pt"),
                             out=folder / name, **KW, **extra)


def killed_run(folder: Path, name: str, method: str) -> list[str]:
    """Run until ``StreamHooks.<method>`` has staged block 0 (``leave_block``) or the final outputs
    (``final_hidden``), then fail on every rank; the staging folder's files afterwards."""
    original = getattr(StreamHooks, method)

    def failing(self: StreamHooks, *args: Any) -> None:
        original(self, *args)
        if method == "final_hidden" or args[0] == 0:
            raise Killed(method)

    setattr(StreamHooks, method, failing)
    try:
        with pytest.raises(Killed):
            streamed(folder, name)
    finally:
        setattr(StreamHooks, method, original)
    return sorted(p.name for p in staging_folder(folder / name).iterdir())


def record_writes(folder: Path, log: list[str]) -> None:
    """Append to ``log`` every file system change this process makes under ``folder``."""
    root = str(folder)

    def under(path: Any) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and under(args[0]):
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \
                bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            if writing:
                log.append(f"open {args[0]} {mode}")
        elif event in WRITES and any(under(a) for a in args[:2]):
            log.append(f"{event} {args[0]}")

    sys.addaudithook(hook)


def outcome_summary(outcome: Any) -> dict[str, Any]:
    fields = ("name", "loss", "rtn_loss", "error")
    return {"out": outcome.out, "distributed": outcome.distributed,
            "layers": [[getattr(r, f) for f in fields] for r in outcome.report.layers]}


def rank_work(comm: Comm, folder: Path) -> dict[str, Any]:
    """Everything one rank does (in a spawned process)."""
    writes: list[str] = []
    if not comm.is_main:
        record_writes(folder, writes)
    out: dict[str, Any] = {"whole": outcome_summary(streamed(folder, "dp"))}
    for method in ("leave_block", "final_hidden"):
        staged = killed_run(folder, f"dp-{method}", method)
        resumed = streamed(folder, f"dp-{method}", resume=True)
        out[method] = (staged, outcome_summary(resumed), resumed.report.calibration)
    killed_run(folder, "dp-other-plan", "leave_block")
    try:
        streamed(folder, "dp-other-plan", head_plan("rtn"), resume=True)
        out["other_plan"] = None
    except ResumeError as err:
        out["other_plan"] = str(err)
    out["writes"] = writes
    return out


@pytest.fixture(scope="module")
def folder(make_llama_folder, tmp_path_factory) -> Path:
    return make_llama_folder(tmp_path_factory.mktemp("stream-dp"))


@pytest.fixture(scope="module")
def ranks(folder) -> list[dict[str, Any]]:
    return run_local(rank_work, 2, (folder,), timeout_s=240)


@pytest.fixture(scope="module")
def reference(folder) -> Any:
    """The in-memory, one-process run of :func:`head_plan`."""
    return quantize(str(folder / "src"), head_plan(), calib=str(folder / "tokens.pt"), out=folder / "memory",
                    **KW)


def tensors(folder: Path, file: str | None = None) -> dict[str, torch.Tensor]:
    if file is None:
        ck = LazyCheckpoint(folder)
        return ck.read(ck.names(), dtype=None)
    from safetensors.torch import load_file

    return load_file(str(folder / file)) if (folder / file).is_file() else {}


def assert_same_folder(a: Path, b: Path) -> None:
    """Bitwise-equal weights, scales, activation ranges and logits; the same plan."""
    for file in (None, "scales.safetensors", "quantizers.safetensors"):
        ta, tb = tensors(a, file), tensors(b, file)
        assert sorted(ta) == sorted(tb) and ta, file
        assert all(torch.equal(ta[k], tb[k]) for k in ta), file
    assert (a / "plan.yaml").read_text() == (b / "plan.yaml").read_text()
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(load_quantized(a)[0](x).logits, load_quantized(b)[0](x).logits)


def test_streamed_data_parallel_equals_one_in_memory_process(ranks, reference, folder) -> None:
    want = outcome_summary(reference)["layers"]
    whole0, whole1 = ranks[0]["whole"], ranks[1]["whole"]
    assert whole0["out"] == folder / "dp" and whole1["out"] is None
    assert_same_folder(reference.out, folder / "dp")
    assert whole0["layers"] == whole1["layers"] == want  # GPTQ proxy losses too, on both ranks
    assert [r["windows"] for r in whole0["distributed"]["ranks"]] == [4, 4]
    assert json.loads((folder / "dp" / "mixq.json").read_text())["streamed"]["ranks"] == 2
    assert not staging_folder(folder / "dp").exists()


@pytest.mark.parametrize("method,done,files", [
    ("leave_block", 1, ["inputs-00001.pt", "inputs-00001.rank1.pt"]),
    ("final_hidden", 2, ["final.pt", "final.rank1.pt"]),
])
def test_interrupted_data_parallel_run_resumes_to_the_same_result(ranks, reference, folder, method, done,
                                                                   files) -> None:
    staged, summary, calibration = ranks[0][method]
    assert set(files) <= set(staged) and MANIFEST in staged
    assert not any(name.startswith("inputs-00000") for name in staged)  # consumed inputs are dropped
    assert summary["out"] == folder / f"dp-{method}" and ranks[1][method][1]["out"] is None
    assert_same_folder(reference.out, folder / f"dp-{method}")
    assert summary["layers"] == outcome_summary(reference)["layers"]  # staged reports restored on rank 0
    assert calibration == reference.report.calibration
    assert not staging_folder(folder / f"dp-{method}").exists()


def test_only_rank_0_writes_and_resume_needs_the_same_ranks(ranks, folder) -> None:
    assert ranks[1]["writes"] == []
    assert "different plan" in ranks[0]["other_plan"]
    assert ranks[1]["other_plan"].startswith("rank 0: ") and "different plan" in ranks[1]["other_plan"]
    stage = staging_folder(folder / "dp-other-plan")
    assert json.loads((stage / MANIFEST).read_text())["ranks"] == 2
    with pytest.raises(ResumeError, match=r"different ranks \(staged 2, now 1\)"):
        streamed(folder, "dp-other-plan", resume=True)
