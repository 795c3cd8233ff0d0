"""SQNR floors of the format study on real weights: all-MiniLM-L6-v2 (fp32, 37 linear layers).

Measured on this model (mean / worst layer, dB) before the floors were set:
  int8:channel 41.18 / 33.48   mxint8 41.67 / 40.54   fp8_e4m3:channel 31.65 / 31.57
  mxfp8_e4m3 30.37 / 27.96     mxfp6_e3m2 25.30 / 24.54   int4:g32 19.90 / 19.15
  nvfp4 20.50 / 20.41          nvint4 21.02 / 20.51     nf4:g64 20.56 / 20.15   mxfp4 18.63 / 17.77
Floors sit about 1.5-2.5 dB below, so that a real regression (a wrong scale rule, a lost mantissa
bit: ~6 dB) fails while noise-level changes do not. Minifloat element formats also get a ceiling,
because their relative step size bounds the SQNR from above whatever the data.
"""

from __future__ import annotations

import math

import pytest

from mixq.eval import study
from mixq.model import linear_weights, load_model

pytestmark = pytest.mark.real

SPECS = ["int8:channel", "mxint8", "fp8_e4m3:channel", "mxfp8_e4m3", "mxfp6_e3m2", "int4:g32", "mxfp4",
         "nvfp4", "nvint4", "nf4:g64"]
# spec: (floor on the mean, ceiling on the mean or None, floor on the worst layer)
BOUNDS = {
    "int8:channel": (39.0, None, 31.0),
    "mxint8": (39.5, None, 38.5),
    "fp8_e4m3:channel": (30.0, 33.5, 30.0),
    "mxfp8_e4m3": (28.5, 32.0, 26.0),
    "mxfp6_e3m2": (23.5, 27.0, 22.5),
    "int4:g32": (18.5, None, 17.5),
    "mxfp4": (17.0, 20.5, 16.0),
    "nvfp4": (19.0, 22.0, 18.5),
    "nvint4": (19.5, None, 18.5),
    "nf4:g64": (19.0, None, 18.5),
}


@pytest.fixture(scope="module")
def minilm_summary() -> dict:
    weights = list(linear_weights(load_model("minilm")))
    assert len(weights) == 37  # 6 blocks x (q, k, v, o, up, down) + pooler
    return {s.spec: s for s in study(weights, SPECS).summary}


@pytest.mark.parametrize("spec", SPECS)
def test_sqnr_floors(minilm_summary, spec):
    s = minilm_summary[spec]
    floor, ceiling, worst = BOUNDS[spec]
    assert s.layers == 37 and s.layers_skipped == 0 and not s.on_grid  # real fp32 weights
    assert s.sqnr_mean_db > floor, f"{spec}: mean SQNR {s.sqnr_mean_db:.2f} dB below {floor}"
    assert ceiling is None or s.sqnr_mean_db < ceiling, f"{spec}: {s.sqnr_mean_db:.2f} dB above {ceiling}"
    assert s.sqnr_min_db > worst, f"{spec}: worst layer {s.sqnr_min_db:.2f} dB below {worst}"


def test_orderings_and_bits(minilm_summary):
    s = minilm_summary
    assert s["nvfp4"].sqnr_mean_db > s["mxfp4"].sqnr_mean_db + 1.0  # finer E4M3 scales, 16-blocks
    assert s["mxint8"].sqnr_mean_db > s["mxfp8_e4m3"].sqnr_mean_db + 8.0  # INT8 beats FP8 on weights
    assert s["mxfp4"].bits_per_value == 4.25 and s["mxint8"].bits_per_value == 8.25
    assert 4.5 < s["nvfp4"].bits_per_value < 4.5 + 2e-4  # one fp32 tensor scale per layer (37 x 32 bits)
    assert 8.02 < s["int8:channel"].bits_per_value < 8.09  # one fp32 scale per row of 384 or 1536
    assert math.isclose(s["int4:g32"].bits_per_value, 5.0)
