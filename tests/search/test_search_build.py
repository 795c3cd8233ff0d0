"""Plans from a choice (round trip, spec per layer), tie groups, pins from patterns and constraint files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from mixq.plan import Candidate, LayerSpec, Options, Plan, parse_candidates
from mixq.quant import bit_count
from mixq.search import (
    LatencyTable,
    SearchError,
    allocation_rows,
    load_constraints,
    pins_from_patterns,
    plan_from_choice,
    tie_groups,
)
from mixq.sensitivity.table import LayerInfo

CANDS = parse_candidates("int4:g32,int8:channel@int8:token,mxfp4,keep")


def layers() -> list[LayerInfo]:
    out = []
    for b in range(2):
        norm = f"model.layers.{b}.input_layernorm"
        out += [LayerInfo(f"model.layers.{b}.self_attn.q_proj", (64, 64), 64 * 64, norm),
                LayerInfo(f"model.layers.{b}.self_attn.k_proj", (32, 64), 32 * 64, norm),
                LayerInfo(f"model.layers.{b}.mlp.down_proj", (64, 128), 64 * 128, None)]
    return out


def test_tie_groups():
    assert tie_groups(layers()) == [[0, 1], [3, 4]]
    assert tie_groups([LayerInfo("a", (4, 4), 16, "g"), LayerInfo("b", (4, 4), 16, None)]) == []


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_plan_round_trip_gives_each_layer_its_candidate(fmt):
    ls = layers() + [LayerInfo("odd[0].proj*", (64, 64), 4096, None)]
    choice = np.array([0, 1, 2, 3, 0, 2, 1])
    opts = Options(act_order=True)
    plan = plan_from_choice(ls, CANDS, choice, algorithm="gptq", keep=("lm_head",), options=opts)
    text = plan.dumps(fmt)
    again = Plan.from_dict(json.loads(text) if fmt == "json" else yaml.safe_load(text))
    assert again == plan
    assert again.rules[0].pattern == "lm_head" and again.rules[0].spec.is_keep
    assert again.spec_for("lm_head")[0].is_keep and again.spec_for("model.embed")[1] is None
    for layer, j in zip(ls, choice):
        spec, rule = again.spec_for(layer.name)
        cand = CANDS[j]
        assert rule is not None and again.rules[rule].matches(layer.name)
        if cand.is_keep:
            assert spec == LayerSpec.keep()
        else:
            assert spec.weights == cand.spec.weights and spec.inputs == cand.spec.inputs
            assert spec.algorithm == "gptq" and spec.options == opts
    assert again.rules[-1].pattern.startswith("re:")  # glob characters in the name are escaped
    assert not again.rules[-1].matches("odd[0].projX")


def test_plan_keep_patterns_win_and_input_only_stays_rtn():
    ls = [LayerInfo("model.layers.0.mlp.up_proj", (64, 64), 4096),
          LayerInfo("model.layers.0.mlp.gate", (64, 64), 4096)]
    cands = parse_candidates("int4:g32,keep")
    act_only = Candidate("act", LayerSpec(inputs=cands[0].spec.weights))
    plan = plan_from_choice(ls, [*cands, act_only], np.array([0, 2]), algorithm="awq", keep=("*.gate",))
    assert [r.pattern for r in plan.rules] == ["*.gate", "model.layers.0.mlp.up_proj"]
    assert plan.spec_for("model.layers.0.mlp.gate")[0].is_keep
    plan = plan_from_choice(ls, [*cands, act_only], np.array([2, 1]), algorithm="awq", keep=())
    assert plan.spec_for("model.layers.0.mlp.up_proj")[0].algorithm == "rtn"
    with pytest.raises(SearchError, match="expected a choice of 2"):
        plan_from_choice(ls, cands, np.array([0]))


def test_allocation_rows():
    rows = allocation_rows(layers(), CANDS, np.array([0, 3, 2, 0, 0, 1]))
    assert rows[0] == {"name": "model.layers.0.self_attn.q_proj", "out": 64, "in": 64,
                       "candidate": "int4:g32",
                       "family": "int", "bits_per_weight": bit_count("int4:g32", (64, 64)).per_value,
                       "bits": bit_count("int4:g32", (64, 64)).total}
    assert rows[1]["bits_per_weight"] == 16.0 and rows[1]["family"] == "keep"
    assert rows[2]["family"] == "float" and rows[5]["candidate"] == "int8:channel@int8:token"


def test_pins_from_patterns():
    ls = layers()
    pins = pins_from_patterns(ls, CANDS, {"*.down_proj": "keep", r"re:model\.layers\.1\..*": "mxfp4"})
    assert pins == {2: 3, 5: 3, 3: 2, 4: 2}  # the first pattern wins for model.layers.1.mlp.down_proj
    # a later pattern is not checked on layers an earlier one pinned (int4:g128 does not fit the q/k_proj)
    cands = parse_candidates("int4:g128,keep")
    assert pins_from_patterns(ls, cands, {"*.self_attn.*": "keep", "*": "int4:g128"}) == \
        {0: 1, 1: 1, 3: 1, 4: 1, 2: 0, 5: 0}
    msg = r"'\*\.up_proj' matches no layer of the profile \(6 layers in 2 blocks"
    with pytest.raises(SearchError, match=msg):
        pins_from_patterns(ls, CANDS, {"*.up_proj": "keep"})
    with pytest.raises(SearchError, match=r"close: model.layers.0.mlp.down_proj"):
        pins_from_patterns(ls, CANDS, {"model.layers.0.mlp.down_prj": "keep"})
    with pytest.raises(SearchError, match=r"pin \*=int5: unknown candidate 'int5'"):
        pins_from_patterns(ls, CANDS, {"*": "int5"})
    cands = parse_candidates("int4:g128,keep")
    with pytest.raises(SearchError, match="int4:g128 does not fit"):
        pins_from_patterns(ls, cands, {"*.q_proj": "int4:g128"})


def test_load_constraints(tmp_path):
    (tmp_path / "lat.csv").write_text("layer,candidate,seconds\n64x64,keep,1\n")
    path = tmp_path / "c.yaml"
    path.write_text("budget: {bits: 4.25, latency: 0.05, bops: 1e12}\npin: {'*.down_proj': keep}\n"
                    "tie: [['*.layers.0.*', '*.layers.1.self_attn.q_proj']]\nlatency_table: lat.csv\n")
    got = load_constraints(path, layers(), CANDS)
    assert got["budget"] == {"bits": 4.25, "latency": 0.05, "bops": 1e12}  # YAML 1.1 reads 1e12 as a string
    assert got["pin"] == {2: 3, 5: 3} and got["tie"] == [[0, 1, 2, 3]]
    assert isinstance(got["latency_table"], LatencyTable)
    assert got["latency_table"].entries == {("64x64", "keep"): 1.0}
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"budget": {"bops": 1e9}}))
    expected = {"budget": {"bops": 1e9}, "pin": {}, "tie": [], "latency_table": None}
    assert load_constraints(js, layers(), CANDS) == expected


@pytest.mark.parametrize("text,match", [
    ("pin: {'model.layers.40.*': keep}\n",
     r"c.yaml: pattern 'model.layers.40.\*' matches no layer of the profile \(6 layers in 2 blocks"),
    ("tie: [['*.q_proj', 'nothing']]\n", "c.yaml: pattern 'nothing' matches no layer"),
    ("budget: {bits: -1}\n", r"c.yaml: budget bits: expected a positive number"),
    ("budget: {bits: four}\n", r"c.yaml: budget bits: expected a positive number, found 'four'"),
    ("budget: {bits: true}\n", r"c.yaml: budget bits: expected a positive number"),
    ("budget: {watts: 3}\n", r"c.yaml: budget: unknown kind 'watts'"),
    ("budgets: {bits: 3}\n", r"c.yaml: unknown key\(s\) \['budgets'\]"),
    ("tie: '*.q_proj'\n", "c.yaml: tie: expected a list of non-empty lists"),
    ("- 1\n", "c.yaml: expected a mapping"),
    ("budget: {bits: [\n", "c.yaml: not valid YAML"),
    ("latency_table: missing.csv\n", "c.yaml: expected a latency table CSV"),
])
def test_load_constraints_errors_name_the_file_and_entry(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(SearchError, match=match):
        load_constraints(path, layers(), CANDS)
    with pytest.raises(SearchError, match="no file"):
        load_constraints(tmp_path / "none.yaml", layers(), CANDS)
