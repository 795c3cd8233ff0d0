"""Cost models: bits equal the one accounting function, bytes, BOPs by hand, latency tables, bits/weight."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixq.plan import parse_candidates
from mixq.quant import bit_count
from mixq.search import COST_KINDS, LatencyTable, SearchError, bits_per_weight, cost_matrix
from mixq.sensitivity.table import LayerInfo

CANDS = parse_candidates("int4:g32,int8:channel,int8:channel@int8:token,int4:g128,keep")


def layers() -> list[LayerInfo]:
    return [LayerInfo("model.layers.0.mlp.up_proj", (64, 128), 64 * 128, None),
            LayerInfo("model.layers.0.mlp.down_proj", (32, 64), 32 * 64, None),
            LayerInfo("model.layers.1.mlp.up_proj", (64, 128), 64 * 128, None)]


def test_bits_equal_bit_count_and_nan_where_not_fitting():
    ls = layers()
    bits = cost_matrix(ls, CANDS, "bits")
    assert bits.shape == (3, 5) and bits.dtype == np.float64
    for i, layer in enumerate(ls):
        for j, cand in enumerate(CANDS):
            if cand.fits(layer.shape) is not None:
                assert math.isnan(bits[i, j])
            elif cand.is_keep:
                assert bits[i, j] == 16.0 * layer.params
            else:
                assert bits[i, j] == bit_count(cand.spec.weights, layer.shape).total
    assert math.isnan(bits[1, 3])  # int4:g128 on in=64
    assert np.isfinite(bits[0]).all()
    np.testing.assert_array_equal(cost_matrix(ls, CANDS, "bytes"), bits / 8)


def test_bops_by_hand():
    layer = [LayerInfo("a", (64, 128), 64 * 128)]
    bops = cost_matrix(layer, CANDS, "bops")[0]
    # int8:channel: 64*128 8-bit codes + 64 fp32 scales = 67584 bits -> 8.25 bits/weight, 16-bit inputs
    assert bit_count(CANDS[1].spec.weights, (64, 128)).total == 67584
    assert bops[1] == 8192 * 8.25 * 16
    assert bops[2] == 8192 * 8.25 * 8  # same weights, int8 inputs
    assert bops[4] == 8192 * 16 * 16  # keep
    # int4:g32: 4-bit codes plus one scale per 32 weights, as the accounting counts them
    per_weight = bit_count(CANDS[0].spec.weights, (64, 128)).per_value
    assert bops[0] == pytest.approx(8192 * per_weight * 16, rel=1e-15)


def test_latency_table_name_then_shape(tmp_path):
    csv = tmp_path / "lat.csv"
    csv.write_text("layer,candidate,seconds\n"
                   "64x128,int4:g32,0.5\n64x128,keep,1.0\n32x64,int4:g32,0.25\n32x64,keep,0.75\n"
                   "model.layers.1.mlp.up_proj,int4:g32,0.125\n\n")
    table = LatencyTable.load(csv)
    cands = parse_candidates("int4:g32,keep")
    lat = cost_matrix(layers(), cands, "latency", table)
    np.testing.assert_array_equal(lat, [[0.5, 1.0], [0.25, 0.75], [0.125, 1.0]])
    with pytest.raises(SearchError, match=r"no entry for layer model.layers.0.mlp.up_proj .*int8:channel"):
        cost_matrix(layers(), parse_candidates("int8:channel"), "latency", table)
    with pytest.raises(SearchError, match="needs a latency table"):
        cost_matrix(layers(), cands, "latency")


@pytest.mark.parametrize("text,where", [
    ("layer,cand,seconds\n", ":1: expected the header"),
    ("layer,candidate,seconds\na,keep,fast\n", ":2: expected a layer"),
    ("layer,candidate,seconds\na,keep,1\na,keep,-1\n", ":3: expected a layer"),
    ("layer,candidate,seconds\na,keep\n", ":2: expected 3 fields"),
    ("layer,candidate,seconds\na,keep,1\na,keep,2\n", ":3: .*appears twice"),
])
def test_latency_table_errors_name_file_and_line(tmp_path, text, where):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(ValueError, match=f"bad.csv{where}"):
        LatencyTable.load(csv)
    with pytest.raises(SearchError, match="no file"):
        LatencyTable.load(tmp_path / "missing.csv")


def test_bits_per_weight_and_kinds():
    ls = layers()
    choice = np.array([4, 0, 1])
    total = 16 * 8192 + bit_count("int4:g32", (32, 64)).total + bit_count("int8:channel", (64, 128)).total
    expected = total / (8192 + 2048 + 8192)
    assert bits_per_weight(ls, CANDS, choice) == pytest.approx(expected, rel=1e-15)
    with pytest.raises(SearchError, match="does not fit"):
        bits_per_weight(ls, CANDS, np.array([0, 3, 0]))
    with pytest.raises(SearchError, match="expected a choice of 3"):
        bits_per_weight(ls, CANDS, np.array([0, 0]))
    with pytest.raises(SearchError, match="unknown cost kind"):
        cost_matrix(ls, CANDS, "watts")
    assert COST_KINDS == ("bits", "bytes", "bops", "latency")


def test_search_sources_never_import_torch_or_a_model():
    from pathlib import Path

    import mixq.search

    for path in Path(mixq.search.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path
        assert "mixq.model" not in text, path
