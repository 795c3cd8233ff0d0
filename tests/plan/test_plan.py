"""Plans as data: rules, matching, validation and the YAML/JSON round trip."""

from __future__ import annotations

import json

import pytest

from mixq.plan import PLAN_VERSION, LayerSpec, Options, Plan, PlanError, Rule
from mixq.quant import QuantSpec

Q = QuantSpec.parse


def rich_plan() -> Plan:
    """A plan touching every field: keep, regex, glob, all quantizers, non-default options."""
    return Plan((
        Rule("lm_head", LayerSpec.keep()),
        Rule(r"re:.*\.(q|k)_proj", LayerSpec(
            weights=Q("int4:g64:asym:mse"), inputs=Q("int8"), static_inputs=True, kv=Q("fp8_e4m3:token"),
            algorithm="gptq", options=Options(act_order=True, damp=0.05, hadamard=32, hadamard_seed=3,
                                              static_groups=True, block_size=64))),
        Rule("*.mlp.*", LayerSpec(weights=Q("int8:channel"), inputs=Q("int8:token"),
                                  options=Options(smooth_alpha=0.5, bias_correction=True, salient=0.01))),
        Rule("*", LayerSpec(weights=Q("mxfp4"), algorithm="awq",
                            options=Options(awq_grid=10, awq_clip=False))),
    ))


# --- round trips -----------------------------------------------------------------------------

def test_dict_round_trip_is_identity():
    p = rich_plan()
    assert Plan.from_dict(p.to_dict()) == p
    # and through the JSON text (strings only, no Python objects)
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_file_round_trip(tmp_path, suffix):
    p = rich_plan()
    path = p.save(tmp_path / f"plan{suffix}")
    text = path.read_text()
    if suffix == ".json":
        assert json.loads(text)["version"] == PLAN_VERSION
    else:
        assert text.startswith(f"version: {PLAN_VERSION}")
    assert Plan.load(path) == p
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary file left


def test_to_dict_is_minimal():
    d = LayerSpec(weights=Q("int4:g64")).to_dict()
    assert d == {"weights": "int4:g64", "algorithm": "rtn"}
    assert LayerSpec.keep().to_dict() == {"keep": True}
    assert Options(damp=0.02).to_dict() == {"damp": 0.02}


def test_yaml_written_by_hand_loads(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - {pattern: lm_head, keep: true}\n"
                    "  - pattern: '*'\n    weights: int4:g64\n    algorithm: gptq\n"
                    "    options: {act_order: true}\n")
    p = Plan.load(path)
    assert p.rules[0].spec.is_keep
    assert p.rules[1].spec == LayerSpec(weights=Q("int4:g64"), algorithm="gptq",
                                        options=Options(act_order=True))


# --- errors of plan files ----------------------------------------------------------------------

def test_version_mismatch():
    d = rich_plan().to_dict()
    d["version"] = 99
    with pytest.raises(PlanError, match=r"version 1.*99"):
        Plan.from_dict(d)
    del d["version"]
    with pytest.raises(PlanError, match="version"):
        Plan.from_dict(d)


def test_not_a_plan():
    for bad in ([], {"version": 1}, "rules", None):
        with pytest.raises(PlanError, match="expected a plan"):
            Plan.from_dict(bad)
    with pytest.raises(PlanError, match="list"):
        Plan.from_dict({"version": 1, "rules": {"pattern": "*"}})
    with pytest.raises(PlanError, match="rule 0.*pattern"):
        Plan.from_dict({"version": 1, "rules": [{"weights": "int4"}]})


def test_unknown_field_named_with_rule():
    d = {"version": 1, "rules": [{"pattern": "*", "keep": True},
                                 {"pattern": "*.q_proj", "weights": "int4", "wieghts": "int8"}]}
    with pytest.raises(PlanError, match=r"rule 1 \('\*\.q_proj'\).*wieghts"):
        Plan.from_dict(d)


def test_unknown_option_named():
    d = {"version": 1, "rules": [{"pattern": "*", "weights": "int4", "options": {"act_ordr": True}}]}
    with pytest.raises(PlanError, match="act_ordr"):
        Plan.from_dict(d)


@pytest.mark.parametrize("options", [{"block_size": "big"}, {"act_order": "yes"}, {"hadamard": 1.5},
                                     {"damp": True}, {"hadamard_seed": "7"}])
def test_bad_option_type_is_a_plan_error(options):
    d = {"version": 1, "rules": [{"pattern": "*", "weights": "int4", "options": options}]}
    with pytest.raises(PlanError, match=next(iter(options))):
        Plan.from_dict(d)


def test_option_types_that_fit():
    o = Options.from_dict({"damp": 0, "smooth_alpha": None, "hadamard_seed": 3, "act_order": True})
    assert o == Options(damp=0.0, hadamard_seed=3, act_order=True)


def test_static_inputs_must_be_a_bool():
    with pytest.raises(PlanError, match="static_inputs"):
        LayerSpec.from_dict({"weights": "int8", "inputs": "int8", "static_inputs": "false"})


def test_bad_spec_string_named():
    d = {"version": 1, "rules": [{"pattern": "*", "weights": "int4:g6x4"}]}
    with pytest.raises(PlanError, match=r"weights.*int4:g6x4|int4:g6x4.*weights"):
        Plan.from_dict(d)


def test_bad_regex():
    with pytest.raises(PlanError, match=r"re:\(unclosed.*regular expression"):
        Rule("re:(unclosed", LayerSpec.keep())
    with pytest.raises(PlanError, match="rule 0"):
        Plan.from_dict({"version": 1, "rules": [{"pattern": "re:[a-", "keep": True}]})
    with pytest.raises(PlanError, match="non-empty"):
        Rule("", LayerSpec.keep())


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="no file"):
        Plan.load(tmp_path / "missing.yaml")
    bad_json = tmp_path / "p.json"
    bad_json.write_text("{not json")
    with pytest.raises(PlanError, match="JSON"):
        Plan.load(bad_json)
    bad_yaml = tmp_path / "p.yaml"
    bad_yaml.write_text("version: 1\nrules: [\n")
    with pytest.raises(PlanError, match="YAML"):
        Plan.load(bad_yaml)
    wrong = tmp_path / "w.yaml"
    wrong.write_text("version: 2\nrules: []\n")
    with pytest.raises(PlanError, match=r"w\.yaml.*version"):
        Plan.load(wrong)


def test_keep_with_quantizers_rejected():
    with pytest.raises(PlanError, match="keep"):
        LayerSpec.from_dict({"keep": True, "weights": "int4"})


# --- matching ----------------------------------------------------------------------------------

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj",
         "model.layers.12.self_attn.q_proj", "lm_head"]


def test_glob_matching():
    assert Rule("*.mlp.*", LayerSpec.keep()).matches("model.layers.0.mlp.up_proj")
    assert not Rule("*.mlp.*", LayerSpec.keep()).matches("model.layers.0.self_attn.q_proj")
    assert Rule("*q_proj", LayerSpec.keep()).matches("model.layers.0.self_attn.q_proj")
    one = Rule("model.layers.1?.self_attn.q_proj", LayerSpec.keep())
    assert [n for n in NAMES if one.matches(n)] == ["model.layers.12.self_attn.q_proj"]
    assert not Rule("LM_HEAD", LayerSpec.keep()).matches("lm_head")  # case-sensitive


def test_regex_matches_whole_name():
    r = Rule(r"re:.*\.(q|k)_proj", LayerSpec.keep())
    assert [n for n in NAMES if r.matches(n)] == [NAMES[0], NAMES[1], NAMES[3]]
    assert not Rule("re:q_proj", LayerSpec.keep()).matches(NAMES[0])  # fullmatch, not search
    assert Rule(r"re:model\.layers\.\d\..*", LayerSpec.keep()).matches(NAMES[2])
    assert not Rule(r"re:model\.layers\.\d\..*", LayerSpec.keep()).matches(NAMES[3])
    # a glob's "." is literal, a regex's "." is any character
    assert not Rule("lm.head", LayerSpec.keep()).matches("lm_head")
    assert Rule("re:lm.head", LayerSpec.keep()).matches("lm_head")


def test_first_match_wins_and_unmatched_is_keep():
    a, b = LayerSpec(weights=Q("int8:channel")), LayerSpec(weights=Q("int4:g64"))
    p = Plan((Rule("*.q_proj", a), Rule("model.layers.0.*", b)))
    assert p.spec_for(NAMES[0]) == (a, 0)       # both match: the first wins
    assert p.spec_for(NAMES[1]) == (b, 1)
    assert p.spec_for("lm_head") == (LayerSpec.keep(), None)
    p2 = Plan((Rule("model.layers.0.*", b), Rule("*.q_proj", a)))
    assert p2.spec_for(NAMES[0]) == (b, 0)       # order matters


def test_keep_rule_shadows_later_rules():
    p = Plan.uniform(LayerSpec(weights=Q("int4:g64")), keep=("lm_head", "*.mlp.*"))
    assert p.spec_for("lm_head")[0].is_keep and p.spec_for("lm_head")[1] == 0
    assert p.spec_for(NAMES[2])[0].is_keep and p.spec_for(NAMES[2])[1] == 1
    assert p.spec_for(NAMES[0]) == (LayerSpec(weights=Q("int4:g64")), 2)
    assert Plan.uniform(LayerSpec.keep(), keep=()).spec_for("x")[0].is_keep


# --- layer spec validation ---------------------------------------------------------------------

def test_layer_spec_validation():
    with pytest.raises(PlanError, match="Hadamard"):
        LayerSpec(weights=Q("int4:g64"), algorithm="awq", options=Options(hadamard=64))
    with pytest.raises(PlanError, match="Hadamard"):
        LayerSpec(weights=Q("int8:channel"), options=Options(hadamard=64, smooth_alpha=0.5))
    with pytest.raises(PlanError, match="static_inputs needs an input spec"):
        LayerSpec(weights=Q("int8"), static_inputs=True)
    with pytest.raises(PlanError, match="'gptq' needs a weight spec"):
        LayerSpec(inputs=Q("int8:token"), algorithm="gptq")
    with pytest.raises(PlanError, match="unknown algorithm 'smoothquant'"):
        LayerSpec(weights=Q("int8"), algorithm="smoothquant")
    with pytest.raises(PlanError, match="Hadamard rotation needs a weight spec"):
        LayerSpec(inputs=Q("int8:token"), options=Options(hadamard=32))


@pytest.mark.parametrize("kwargs, word", [
    ({"block_size": 0}, "block_size"), ({"damp": 1.0}, "damp"), ({"damp": -0.1}, "damp"),
    ({"smooth_alpha": 1.5}, "smooth_alpha"), ({"hadamard": 48}, "hadamard"), ({"hadamard": -2}, "hadamard"),
    ({"salient": 1.0}, "salient"),
])
def test_option_validation(kwargs, word):
    with pytest.raises(PlanError, match=word):
        Options(**kwargs)


def test_options_accept_edges():
    assert Options(hadamard=-1).hadamard == -1
    assert Options(hadamard=1).hadamard == 1
    assert Options(smooth_alpha=0.0).smooth_alpha == 0.0


def test_keep_and_describe():
    assert LayerSpec.keep().is_keep and LayerSpec.keep().describe() == "keep"
    s = LayerSpec(weights=Q("int4:g64"), inputs=Q("int8"), static_inputs=True, kv=Q("int8:token"),
                  algorithm="gptq")
    assert not s.is_keep
    assert s.describe() == "int4:g64 gptq, in int8 static, kv int8:token"
    assert LayerSpec(kv=Q("int8:token")).describe() == "kv int8:token"
    assert not LayerSpec(kv=Q("int8:token")).is_keep
    assert s.with_options(act_order=True).options.act_order and not s.options.act_order
