"""validate(): Spearman rank correlation of each predicted metric with measured KL."""

import copy

import numpy as np
import pytest
from scipy.stats import spearmanr

from conftest import lm_batches, make_llama
from mixq.plan import parse_candidates
from mixq.sensitivity import ProfileError, SensitivityTable, profile, validate
from mixq.sensitivity.validate import spearman

CANDS = "int2:channel,int3:channel,int4:channel,int8:channel,keep"


@pytest.fixture(scope="module")
def table(llama):
    return profile(llama, parse_candidates(CANDS), lm_batches(), metrics=("weight", "fisher", "hessian"),
                   model_name="tiny", hutchinson_samples=2)


def test_rho_per_metric_and_pairs(table, llama, tmp_path) -> None:
    t = copy.deepcopy(table)
    result = validate(t, llama, lm_batches(), pairs=20, seed=3)
    assert t.validation is result and result["measured_by"] == "kl" and result["seconds"] > 0
    assert set(result["spearman"]) == {"weight", "fisher", "hessian"}
    for rho in result["spearman"].values():
        assert -1.0 <= rho <= 1.0
    rows = result["pairs"]
    assert len(rows) == 20 and len({(r["layer"], r["candidate"]) for r in rows}) == 20
    assert all(r["candidate"] != "keep" and r["measured"] > 0 for r in rows)
    rho = spearmanr([r["fisher"] for r in rows], [r["measured"] for r in rows]).statistic
    assert result["spearman"]["fisher"] == pytest.approx(rho)
    assert result["spearman"]["fisher"] > 0.5  # Fisher predicts the measured KL on this model
    again = validate(copy.deepcopy(table), llama, lm_batches(), pairs=20, seed=3)
    assert [r["measured"] for r in again["pairs"]] == [r["measured"] for r in rows]  # seeded
    t.save(tmp_path)
    assert SensitivityTable.load(tmp_path).validation["spearman"] == pytest.approx(result["spearman"])


def test_uses_the_tables_own_kl(llama) -> None:
    t = profile(llama, parse_candidates(CANDS), lm_batches(), metrics=("fisher", "kl"), hutchinson_samples=1)
    result = validate(t, llama, [], pairs=100)  # no batches needed: kl is in the table
    assert len(result["pairs"]) == 14 * 4 and set(result["spearman"]) == {"fisher"}
    names = [x.name for x in t.layers]
    for r in result["pairs"]:
        i, j = names.index(r["layer"]), t.candidates.index(r["candidate"])
        assert r["measured"] == t.scores["kl"][i, j]


def test_other_model_is_refused(table) -> None:
    other = make_llama()
    other.model.layers = other.model.layers[:1]
    with pytest.raises(ProfileError, match="profile was made on tiny \\(14 layers\\)"):
        validate(copy.deepcopy(table), other, lm_batches(), pairs=4)


def test_spearman_edge_cases() -> None:
    assert np.isnan(spearman([1.0], [2.0])) and np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert spearman([1, 2, 3], [10, 20, 40]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == -1.0
