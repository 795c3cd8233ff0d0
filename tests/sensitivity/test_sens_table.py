"""SensitivityTable: save/load round trip, CSV rows, fingerprints and errors."""

import csv
import json
import math

import numpy as np
import pytest

from mixq.plan import parse_candidate
from mixq.sensitivity.table import LayerInfo, ProfileError, SensitivityTable, model_fingerprint

LAYERS = [LayerInfo("model.layers.0.q", (64, 128), 64 * 128, "model.layers.0.norm"),
          LayerInfo("model.layers.0.o", (128, 64), 128 * 64)]
CANDS = ["int4:g128", "int8:channel", "keep"]


def table() -> SensitivityTable:
    fp = model_fingerprint([(x.name, x.shape) for x in LAYERS])
    scores = {"weight": np.array([[1.5, 0.25, 0.0], [np.nan, 0.125, 0.0]]),
              "kl": np.array([[np.inf, 1e-300, 0.0], [np.nan, 3.0, 0.0]])}
    seconds = {m: np.arange(6, dtype=float).reshape(2, 3) for m in scores}
    return SensitivityTable("tiny", fp, list(LAYERS), list(CANDS), scores, seconds, ["a note"],
                            {"spearman": {"weight": float("nan")}, "pairs": []},
                            {"kind": "lm", "samples": np.int64(4), "ratio": np.float32(0.5)})


def test_layer_info_params() -> None:
    assert LAYERS[0].params == 64 * 128
    assert LAYERS[1].group is None


def test_fingerprint_is_order_and_shape_sensitive() -> None:
    a = model_fingerprint([("x", (2, 3)), ("y", (3, 2))])
    assert len(a) == 16 and int(a, 16) >= 0
    assert a == model_fingerprint([("x", (2, 3)), ("y", (3, 2))])
    assert a != model_fingerprint([("y", (3, 2)), ("x", (2, 3))])
    assert a != model_fingerprint([("x", (3, 2)), ("y", (3, 2))])


def test_save_load_round_trip(tmp_path) -> None:
    t = table()
    path = t.save(tmp_path / "prof")
    assert path == tmp_path / "prof" / "profile.json"
    raw = json.loads(path.read_text())
    assert raw["scores"]["weight"][1][0] is None and raw["scores"]["kl"][0][0] == "inf"
    u = SensitivityTable.load(tmp_path / "prof")  # a folder
    v = SensitivityTable.load(path)  # the file
    for other in (u, v):
        assert other.layers == t.layers and other.candidates == t.candidates
        assert other.model == "tiny" and other.fingerprint == t.fingerprint and other.notes == ["a note"]
        for m in t.scores:
            np.testing.assert_array_equal(other.scores[m], t.scores[m])  # NaN == NaN here, bit-exact floats
            np.testing.assert_array_equal(other.seconds[m], t.seconds[m])
        assert other.meta == {"kind": "lm", "samples": 4, "ratio": 0.5}
        assert other.validation["spearman"]["weight"] is None
    assert [c.name for c in u.candidate_objects()] == CANDS


def test_csv_rows(tmp_path) -> None:
    table().save(tmp_path)
    rows = list(csv.DictReader((tmp_path / "profile.csv").open()))
    assert len(rows) == len(LAYERS) * len(CANDS)
    assert list(rows[0]) == ["layer", "candidate", "out", "in", "bits_per_weight", "weight", "kl", "weight_s", "kl_s"]
    r = rows[0]
    assert (r["layer"], r["candidate"], r["out"], r["in"]) == ("model.layers.0.q", "int4:g128", "64", "128")
    expected_bpw = parse_candidate("int4:g128").weight_bits((64, 128)) / (64 * 128)
    assert math.isclose(float(r["bits_per_weight"]), expected_bpw)
    assert float(r["weight"]) == 1.5 and float(r["kl_s"]) == 0.0
    assert rows[3]["weight"] == ""  # NaN
    assert float(rows[2]["bits_per_weight"]) == 16.0  # keep


def test_metric_and_applicable() -> None:
    t = table()
    np.testing.assert_array_equal(t.applicable(), [[True, True, True], [False, True, True]])
    with pytest.raises(ProfileError, match="metric 'fisher' is not in this profile; available: weight, kl"):
        t.metric("fisher")
    assert t.metric("weight")[0, 0] == 1.5


def test_check_model_messages() -> None:
    t = table()
    t.check_model(t.fingerprint, [x.name for x in LAYERS])  # same: no error
    with pytest.raises(ProfileError, match=r"profile was made on tiny \(2 layers\); this model \(2 layers\) "
                                           r"differs: first differing layer #1: profile has model.layers.0.o"):
        t.check_model("0" * 16, ["model.layers.0.q", "model.layers.0.x"])
    with pytest.raises(ProfileError, match=r"first differing layer #0: profile has model.layers.0.q \[64, 128\], "
                                           r"model has model.layers.0.q \[64, 64\]"):
        t.check_model("0" * 16, [("model.layers.0.q", (64, 64)), ("model.layers.0.o", (128, 64))])
    with pytest.raises(ProfileError, match="#2: profile has nothing"):
        t.check_model("0" * 16, [x.name for x in LAYERS] + ["extra"])


def test_shape_mismatch_and_load_errors(tmp_path) -> None:
    with pytest.raises(ProfileError, match=r"scores\['weight'\] must be \[2, 3\]"):
        SensitivityTable("m", "f", list(LAYERS), list(CANDS), {"weight": np.zeros((3, 2))}, {})
    with pytest.raises(ProfileError, match="found nothing at"):
        SensitivityTable.load(tmp_path / "missing")
    (tmp_path / "profile.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not a readable JSON profile"):
        SensitivityTable.load(tmp_path)
    d = table().to_dict()
    d["version"] = 99
    (tmp_path / "profile.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="expected profile version 1, found 99"):
        SensitivityTable.load(tmp_path)
    d = table().to_dict()
    d["scores"]["weight"] = [[1.0, 2.0]]
    (tmp_path / "profile.json").write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=r"scores\['weight'\]: expected shape \[2, 3\], found \[1, 2\]"):
        SensitivityTable.load(tmp_path)
