"""Data-parallel calibration and sharded profiling (mixq.dist) on tiny tensors and a tiny random Llama.

One 2-process gloo run on localhost (spawned once per module, ~15 s) does every distributed step;
the tests compare its results with one process's:

- statistic reductions: Hessians (fp64 sums, read as fp32: relative 1e-6), channel maxima, observer
  ranges and the AWQ row sample (rank 0 fills it) exact, means to fp64 rounding;
- quantize_model with DataParallelHooks: every weight equal to one process's, with one or two
  calibration batches per rank (the fp64 Hessian sums round to the same fp32 Hessian whatever the
  split); SmoothQuant + static input ranges (maxima only) exact;
- profile with ShardedProfile: every metric but ``fisher`` bit-identical, ``fisher`` within 1e-5;
- pipeline.quantize under the process group: only rank 0 writes the run folder.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mixq.algorithms.layer_stats import LayerStats
from mixq.algorithms.runner import quantize_model
from mixq.dist import Comm, DataParallelHooks, ShardedProfile, run_local, shard_range
from mixq.model.qmodules import ActQuantizer
from mixq.plan import LayerSpec, Options, Plan, parse_candidates
from mixq.quant import QuantSpec
from mixq.sensitivity.profile import profile

Q = QuantSpec.parse
CALLS = torch.randn(16, 10, 8, generator=torch.Generator().manual_seed(3))  # 16 calls of 10 rows, 8 wide
PLANS = {
    "gptq": Plan.uniform(LayerSpec(weights=Q("int4:g16"), algorithm="gptq")),
    "w8a8-smooth-static": Plan.uniform(LayerSpec(weights=Q("int8:channel"), inputs=Q("int8"),
                                                 static_inputs=True, options=Options(smooth_alpha=0.5))),
}
CANDIDATES = "int4:channel,int8:channel,int8:channel@int4:token,keep"
METRICS = ("weight", "fisher", "fisher_model", "hessian", "kl")


def calls_stats(calls: torch.Tensor) -> tuple[LayerStats, ActQuantizer]:
    st = LayerStats(8, hessian=True, absmax=True, mean=True, sample_rows=16)
    obs = ActQuantizer(Q("int8"), static=True, channels=8)
    for x in calls:
        st.add(x)
        obs.observe(x)
    return st, obs


def load_tiny(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder / "src").eval()


def windows(folder: Path, n: int = 8, length: int = 32) -> torch.Tensor:
    tokens = torch.load(folder / "tokens.pt")
    return tokens[:n * length].reshape(n, length)  # [n, length]


def lm_batches(folder: Path) -> list[dict[str, torch.Tensor]]:
    w = windows(folder, 6, 16)
    return [{"input_ids": w[i:i + 2]} for i in range(0, 6, 2)]


def quantized_state(model: torch.nn.Module, plan: Plan, calib: torch.Tensor, batch_size: int,
                    comm: Comm | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """(float tensors of the quantized model's state, GPTQ proxy loss of each layer)."""
    hooks = DataParallelHooks(comm) if comm is not None else None
    report = quantize_model(model, plan, calib, batch_size=batch_size, hooks=hooks)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    return state, [r.loss for r in report.layers]


def rank_work(comm: Comm, folder: Path) -> dict:
    """Everything one rank does (runs in a spawned process)."""
    from mixq.dist.reduce import reduce_layer_stats, reduce_observers
    from mixq.pipeline import quantize

    out: dict = {}
    start, stop = shard_range(len(CALLS), comm.rank, comm.world_size)
    st, obs = calls_stats(CALLS[start:stop])
    reduce_layer_stats(comm, [st])
    reduce_observers(comm, [obs])
    out["stats"] = (st.H, st.absmax, st.mean, st.count, st.sample, obs.lo, obs.hi)
    lonely, _ = calls_stats(CALLS[:3] if comm.rank == 0 else CALLS[:0])  # rank 1 saw no rows at all
    reduce_layer_stats(comm, [lonely])
    out["lonely"] = (lonely.H, lonely.count)
    calib = windows(folder)
    for name, plan in PLANS.items():
        for batch in (4, 2):
            s, e = shard_range(calib.shape[0], comm.rank, comm.world_size)
            out[(name, batch)] = quantized_state(load_tiny(folder), plan, calib[s:e], batch, comm)
    table = profile(load_tiny(folder), parse_candidates(CANDIDATES), lm_batches(folder), metrics=METRICS,
                    hutchinson_samples=2, hooks=ShardedProfile(comm))
    out["profile"] = table.scores
    outcome = quantize(str(folder / "src"), PLANS["gptq"], calib=str(folder / "tokens.pt"), samples=8,
                       length=32, batch_size=4, out=folder / "run-dp")
    out["pipeline"] = ({k: v for k, v in outcome.model.state_dict().items() if v.is_floating_point()},
                       outcome.out, outcome.distributed, outcome.report.calibration)
    return out


@pytest.fixture(scope="module")
def folder(make_llama_folder, tmp_path_factory) -> Path:
    return make_llama_folder(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def ranks(folder) -> list[dict]:
    return run_local(rank_work, 2, (folder,), timeout_s=240)


def test_shard_range_covers_everything_once() -> None:
    for n in range(0, 12):
        for world in range(1, 5):
            parts = [shard_range(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(e - s for s, e in parts) - min(e - s for s, e in parts) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_range(4, 2, 2)


def test_single_process_comm_is_the_identity() -> None:
    comm = Comm.single()
    t = torch.arange(3.0)
    assert comm.all_reduce_(t, "max") is t and torch.equal(t, torch.arange(3.0))
    assert comm.all_gather_object("x") == ["x"] and comm.broadcast_object(5) == 5
    with pytest.raises(ValueError, match="reduction"):
        comm.all_reduce_(t, "prod")


def test_statistics_reduce_to_one_process(ranks) -> None:
    st, obs = calls_stats(CALLS)
    for rank in ranks:
        H, absmax, mean, count, sample, lo, hi = rank["stats"]
        assert torch.allclose(H, st.H, rtol=1e-6, atol=1e-6 * float(st.H.abs().max()))
        assert torch.equal(absmax, st.absmax) and torch.equal(lo, obs.lo) and torch.equal(hi, obs.hi)
        assert count == st.count == 160
        assert torch.allclose(mean, st.mean, rtol=0, atol=1e-7)
        assert torch.equal(sample, st.sample)  # rank 0's 8 calls fill the 16-row sample
    assert torch.equal(ranks[0]["stats"][0], ranks[1]["stats"][0])  # ranks agree bit for bit
    alone, _ = calls_stats(CALLS[:3])
    for rank in ranks:  # a rank without rows contributes nothing
        assert torch.equal(rank["lonely"][0], alone.H) and rank["lonely"][1] == 30


@pytest.mark.parametrize("name", list(PLANS))
def test_data_parallel_quantization_equals_one_process(ranks, folder, name) -> None:
    calib = windows(folder)
    single = {batch: quantized_state(load_tiny(folder), PLANS[name], calib, batch) for batch in (4, 2)}
    for batch in (4, 2):
        (dp, dp_loss), (ref, ref_loss) = ranks[0][(name, batch)], single[batch]
        assert dp.keys() == ref.keys()
        assert all(torch.equal(dp[k], ranks[1][(name, batch)][0][k]) for k in dp)  # ranks agree bit for bit
        # fp64 Hessian sums make GPTQ's input independent of how rows were split over batches and ranks
        assert all(torch.equal(dp[k], ref[k]) for k in dp), name
        assert dp_loss == ref_loss  # the proxy losses too (None where no Hessian is kept)


def test_sharded_profile_equals_one_process(ranks, folder) -> None:
    table = profile(load_tiny(folder), parse_candidates(CANDIDATES), lm_batches(folder), metrics=METRICS,
                    hutchinson_samples=2)
    for rank in ranks:
        for m in METRICS:
            got, want = rank["profile"][m], table.scores[m]
            if m == "fisher":
                assert got == pytest.approx(want, rel=1e-5, nan_ok=True)
            else:
                assert (got == want).sum() + (got != got).sum() == want.size, m  # bitwise, NaN where NaN


def test_pipeline_writes_once_and_matches(ranks, folder) -> None:
    from mixq.pipeline import quantize

    single = quantize(str(folder / "src"), PLANS["gptq"], calib=str(folder / "tokens.pt"), samples=8,
                      length=32, batch_size=4)
    state0, out0, dist0, calib0 = ranks[0]["pipeline"]
    state1, out1, _, calib1 = ranks[1]["pipeline"]
    assert out0 == folder / "run-dp" and out1 is None and (folder / "run-dp" / "mixq.json").exists()
    assert dist0["world_size"] == 2 and [r["windows"] for r in dist0["ranks"]] == [4, 4]
    assert calib0 == calib1 == single.report.calibration
    ref = {k: v for k, v in single.model.state_dict().items() if v.is_floating_point()}
    assert all(torch.equal(state0[k], ref[k]) and torch.equal(state1[k], ref[k]) for k in ref)


def test_deepcopy_hooks_do_nothing_alone() -> None:
    hooks = DataParallelHooks(Comm.single())
    assert hooks.start(["a"]) == (0, None)
    st = copy.deepcopy(calls_stats(CALLS[:2])[0])
    H = st.H.clone()
    hooks.reduce_stats([st])
    assert torch.equal(st.H, H)
