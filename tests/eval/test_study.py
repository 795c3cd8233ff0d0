"""The format study on small synthetic tensors: metrics, skips, the degenerate flag, outputs."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import mixq
from mixq.eval import ON_GRID_DB, StudyResult, spec_family, sqnr_db, study
from mixq.quant import SpecError


def on_int4_grid(rows: int = 8, cols: int = 64, pow2: bool = True) -> torch.Tensor:
    """Weights already on a per-row int4 grid. With power-of-two steps int4:channel reproduces them
    exactly; with other steps fp32 rounding of ``amax / 7`` leaves an error near 1e-7 (~140 dB)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-7, 8, (rows, cols), generator=g).float()
    q[:, 0] = 7  # every row reaches the largest code, so absmax scaling finds the grid's own step
    steps = 2.0 ** -torch.arange(6, 6 + rows) if pow2 else torch.linspace(0.01, 0.02, rows)
    return q * steps[:, None].float()


def test_metrics_match_their_definitions():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    result = study([("w", x)], ["int4:g32", "mxfp4"])
    for row in result.layers:
        q = mixq.fake_quantize(x, row.spec)
        err = float(((x.double() - q.double()) ** 2).sum())
        assert row.error == pytest.approx(err, rel=1e-9)
        assert row.mse == pytest.approx(err / x.numel(), rel=1e-9)
        assert row.sqnr_db == pytest.approx(10 * math.log10(float((x.double() ** 2).sum()) / err), rel=1e-9)
        assert row.bits_per_value == mixq.bits_per_value(row.spec, (16, 64))


def test_summary_is_numel_weighted():
    a, b = torch.randn(4, 32), torch.randn(8, 96)
    s = study([("a", a), ("b", b)], ["int4:channel"]).summary[0]
    bpv = [mixq.bits_per_value("int4:channel", t.shape) for t in (a, b)]
    weighted = (bpv[0] * a.numel() + bpv[1] * b.numel()) / (a.numel() + b.numel())
    assert s.bits_per_value == pytest.approx(weighted)
    assert s.layers == 2 and s.family == "INT"


def test_exact_grid_is_flagged_and_serialises():
    x = on_int4_grid()
    result = study([("grid", x), ("noise", torch.randn(8, 64))], ["int4:channel", "int8:channel"])
    s = {r.spec: r for r in result.summary}
    assert result.layers[0].sqnr_db == math.inf
    assert s["int4:channel"].layers_on_grid == 1 and s["int4:channel"].on_grid
    assert "already on this grid" in s["int4:channel"].note
    assert s["int4:channel"].sqnr_mean_db == math.inf and math.isfinite(s["int4:channel"].sqnr_min_db)
    assert not s["int8:channel"].on_grid and s["int8:channel"].sqnr_min_db < ON_GRID_DB
    data = json.loads(json.dumps(result.to_json(), allow_nan=False))  # strict JSON
    assert data["layers"][0]["sqnr_db"] == "inf"
    median = data["summary"][0]["sqnr_median_db"]
    assert median == "inf" and float(median) == math.inf


def test_nearly_exact_grid_is_flagged_too():
    s = study([("grid", on_int4_grid(pow2=False))], ["int4:channel"]).summary[0]
    assert ON_GRID_DB < s.sqnr_min_db < math.inf and s.on_grid


def test_group_size_that_does_not_divide_is_skipped_not_raised():
    result = study([("a", torch.randn(4, 576)), ("b", torch.randn(4, 256))], ["int4:g128", "int4:g32"])
    g128 = result.summary[0]
    assert (g128.layers, g128.layers_skipped) == (1, 1)
    assert "group size 128" in g128.skip_reasons[0] and "576" in g128.skip_reasons[0]
    assert "skipped on 1 layer" in g128.note
    assert result.layers[0].skipped and result.layers[0].sqnr_db is None


def test_spec_skipped_everywhere_gives_nan_summary_and_null_json():
    result = study([("a", torch.randn(4, 96))], ["int4:g64"])
    s = result.summary[0]
    assert s.layers == 0 and math.isnan(s.bits_per_value) and math.isnan(s.sqnr_mean_db)
    data = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert data["summary"][0]["sqnr_mean_db"] is None and data["summary"][0]["bits_per_value"] is None
    from rich.console import Console

    Console(file=open("/dev/null", "w")).print(result.table())  # renders without error


def test_bad_spec_raises_before_any_work():
    calls = []
    with pytest.raises(SpecError):
        study([("a", torch.randn(4, 32))], ["int4:g32", "int4:nope"], progress=lambda *a: calls.append(a))
    assert calls == []


def test_progress_and_duplicates():
    seen = []
    w = [("a", torch.randn(4, 32)), ("b", torch.randn(2, 32))]
    result = study(w, ["int8", "int8:tensor", "mxfp4"], progress=lambda d, t, m: seen.append((d, t)))
    assert result.specs == ["int8", "mxfp4"]  # the same spec written twice is measured once
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (384.0, 384.0)
    gen_seen = []
    study(iter(w), ["int8"], progress=lambda d, t, m: gen_seen.append(t))
    assert set(gen_seen) == {None}  # a generator has no length: the total is unknown


def test_stochastic_rounding_is_seeded():
    x = torch.randn(8, 64)
    a, b = (study([("x", x)], ["int4:g32:sr"], seed=3).layers[0].error for _ in range(2))
    assert a == b


def test_families_and_sqnr_helper():
    specs = ("int4:g32", "nvint4", "mxfp4", "fp8_e4m3", "nf4:g64")
    fam = {s: spec_family(mixq.QuantSpec.parse(s)) for s in specs}
    assert fam == {"int4:g32": "INT", "nvint4": "INT", "mxfp4": "FP", "fp8_e4m3": "FP", "nf4:g64": "grid"}
    assert sqnr_db(1.0, 0.0) == math.inf and sqnr_db(100.0, 1.0) == pytest.approx(20.0)


def test_save_writes_all_files(tmp_path):
    result = study([("grid", on_int4_grid()), ("noise", torch.randn(8, 64))], ["int4:channel", "nvfp4"])
    result.meta["model"] = "synthetic"
    paths = result.save(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["environment.json", "study.csv", "study.json",
                                                                   "study.png"]
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 4 and rows[0]["sqnr_db"] == "inf" and rows[0]["family"] == "INT"
    assert json.loads(paths["json"].read_text())["model"] == "synthetic"
    assert paths["png"].stat().st_size > 10_000
    assert isinstance(result, StudyResult)
