"""profile(): scores of every (layer, candidate) pair; the model is left exactly as it was."""

import copy

import numpy as np
import pytest
import torch

from conftest import encoder_batches, lm_batches
from mixq.algorithms.rtn import rtn
from mixq.model.tree import weight_matrix
from mixq.plan import parse_candidates
from mixq.sensitivity import METRICS, ProfileError, profile, profile_layers
from mixq.sensitivity.measured import OutputCache

ALL = ("weight", "fisher", "fisher_model", "hessian", "kl")


@pytest.fixture(scope="module")
def lm_run(llama):
    cands = parse_candidates("int2:channel,int4:channel,int8:channel,int4:g128,int8:channel@int4:token,keep")
    model = copy.deepcopy(llama)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.requires_grad_(False)  # flags must come back as they were
    model.model.layers[0].train()  # mixed training flags must come back too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    stages = []
    table = profile(model, cands, lm_batches(), metrics=ALL, model_name="tiny-llama", hutchinson_samples=2,
                    progress=lambda stage, done, total: stages.append(stage))
    return model, cands, table, before, flags, modes, stages


def test_model_left_unchanged(lm_run) -> None:
    model, _, _, before, flags, modes, _ = lm_run
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks and not m._backward_hooks


def test_shapes_keep_and_not_fitting(lm_run) -> None:
    model, cands, table, *_ = lm_run
    names = [x.name for x in table.layers]
    assert len(names) == 14 and "lm_head" not in names and table.model == "tiny-llama"
    assert table.candidates == [c.name for c in cands]
    keep, g128 = table.candidates.index("keep"), table.candidates.index("int4:g128")
    down = [i for i, n in enumerate(names) if n.endswith("down_proj")]  # in = 128: the only layers g128 fits
    for m in ALL:
        s = table.metric(m)
        assert s.shape == (14, 6)
        assert np.all(s[:, keep] == 0.0) and np.all(table.seconds[m][:, keep] == 0.0)
        fits = ~np.isnan(s[:, g128])
        assert fits.nonzero()[0].tolist() == down
        assert np.all(table.seconds[m][~fits, g128] == 0.0)
        others = np.delete(s, g128, axis=1)
        assert np.isfinite(others).all()
    assert len(table.notes) == 12
    assert table.notes[0].startswith("int4:g128 does not fit model.layers.0.self_attn.q_proj (weight [64, 64]): ")
    assert table.meta["kind"] == "lm" and table.meta["batches"] == 2 and table.meta["tokens"] == 64
    assert table.meta["metrics"] == list(ALL) and table.meta["hutchinson_samples"] == 2


def test_weight_and_hessian_formulas(lm_run) -> None:
    model, cands, table, *_ = lm_run
    for i, layer in enumerate(table.layers):
        W = weight_matrix(model.get_submodule(layer.name))
        for j, c in enumerate(cands):
            if c.is_keep or np.isnan(table.scores["weight"][i, j]):
                continue
            err = float(((rtn(W, c.spec.weights).weight.double() - W.double()) ** 2).sum())
            assert table.scores["weight"][i, j] == pytest.approx(err, rel=1e-9)
        # HAWQ: hessian / weight is the same tr(H)/(2n) for every candidate of a layer
        ratio = table.scores["hessian"][i, :3] / table.scores["weight"][i, :3]
        assert ratio == pytest.approx(np.full(3, ratio[0]), rel=1e-9)


def test_fisher_orders_formats_and_counts_inputs(lm_run) -> None:
    _, _, table, *_ = lm_run
    f = table.scores["fisher"]
    assert np.all(f[:, :3] > 0)
    assert np.all(f[:, 0] > f[:, 1]) and np.all(f[:, 1] > f[:, 2])  # int2 > int4 > int8 weights
    assert np.all(f[:, 4] > f[:, 2])  # same int8 weights plus 4-bit inputs


def test_kl_column_is_the_measured_kl(lm_run, llama) -> None:
    model, cands, table, *_ = lm_run
    kl = table.scores["kl"]
    assert np.all(kl[:, 0] > kl[:, 2])  # int2 hurts more than int8 on every layer
    cache = OutputCache(model, lm_batches(), "lm")
    i = [x.name for x in table.layers].index("model.layers.1.self_attn.v_proj")
    W = weight_matrix(model.get_submodule(table.layers[i].name))
    assert kl[i, 1] == cache.measure(table.layers[i].name, rtn(W, cands[1].spec.weights).weight)


def test_seconds_and_progress(lm_run) -> None:
    _, _, table, *_, stages = lm_run
    for m in ALL:
        assert np.all(table.seconds[m] >= 0)
    assert np.all(table.seconds["fisher"][:, :3] > 0)
    assert {"fisher", "hessian", "cache", "pairs"} <= set(stages)
    assert table.meta["seconds"] > 0


def test_profile_layers_groups_and_keep(llama) -> None:
    layers = {x.name: x for x in profile_layers(llama)}
    assert "lm_head" not in layers
    q = layers["model.layers.1.self_attn.q_proj"]
    assert q.shape == (64, 64) and q.macs == 64 * 64 and q.group == "model.layers.1.input_layernorm"
    assert layers["model.layers.1.self_attn.k_proj"].shape == (32, 64)
    assert layers["model.layers.0.mlp.up_proj"].group == "model.layers.0.post_attention_layernorm"
    assert layers["model.layers.0.mlp.down_proj"].group is None
    assert layers["model.layers.0.self_attn.o_proj"].group is None
    kept = profile_layers(llama, keep=("lm_head", "*.k_proj", "re:.*layers\\.1\\..*"))
    names = [x.name for x in kept]
    assert len(names) == 6 and not any("k_proj" in n or "layers.1." in n for n in names)
    assert next(x for x in kept if x.name.endswith("q_proj")).group is None  # k is kept: no q/k/v tie
    assert "lm_head" in [x.name for x in profile_layers(llama, keep=())]


def test_encoder_profile(bert) -> None:
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    cands = parse_candidates("int2:channel,int8:channel,keep")
    table = profile(bert, cands, encoder_batches(), kind="encoder", metrics=ALL, hutchinson_samples=2)
    assert all(torch.equal(before[k], v) for k, v in bert.state_dict().items())
    names = [x.name for x in table.layers]
    assert len(names) == 13 and names[-1] == "pooler.dense"
    for m in ALL:
        s = table.metric(m)
        assert np.isfinite(s).all() and np.all(s[:, 2] == 0.0)
    assert np.all(table.scores["fisher"][:, 0] >= table.scores["fisher"][:, 1])
    assert np.all(table.scores["kl"][:-1, 0] > table.scores["kl"][:-1, 1])
    assert table.scores["kl"][-1, 0] == pytest.approx(0.0, abs=1e-7)  # the pooler does not feed last_hidden_state
    assert table.meta["kind"] == "encoder" and table.meta["tokens"] == 12 + 7 + 12 + 5 + 12 + 9


def test_weight_metric_needs_no_data(llama) -> None:
    table = profile(llama, parse_candidates("int4:channel,keep"), [], metrics=("weight",))
    assert table.meta["batches"] == 0 and np.all(table.scores["weight"][:, 0] > 0)
    assert METRICS == ALL


def test_errors(llama, bert) -> None:
    cands = parse_candidates("int4:channel")
    with pytest.raises(ProfileError, match="expected metrics among weight, fisher, fisher_model, hessian, kl, found \\['ppl'\\]"):
        profile(llama, cands, lm_batches(), metrics=("ppl",))
    with pytest.raises(ProfileError, match="expected at least one candidate"):
        profile(llama, [], lm_batches())
    with pytest.raises(ProfileError, match="expected at least one calibration batch"):
        profile(llama, cands, [], metrics=("fisher",))
    with pytest.raises(ProfileError, match="an encoder batch needs 'attention_mask'"):
        profile(bert, cands, [{"input_ids": torch.ones(1, 4, dtype=torch.long)}], kind="encoder")
    with pytest.raises(ProfileError, match="expected kind 'lm' or 'encoder', found 'vision'"):
        profile(llama, cands, lm_batches(), kind="vision")
    with pytest.raises(ProfileError, match="no quantizable layer left"):
        profile(llama, cands, lm_batches(), keep=("*",))
