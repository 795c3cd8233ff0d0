"""Properties of rounding and fake quantization, checked with hypothesis on small tensors.

Idempotence ``fq(fq(x)) == fq(x)`` holds *exactly* only where the second pass provably picks the
same scales:

- power-of-two scales by the floor rule (all MX formats, ``:e8m0``) with a symmetric element: the
  group max ``m`` lies in ``[2**emax, 2**(emax+1)) * 2**X``; its element rounds into
  ``[2**emax, elem_max]``, so the rebuilt max has the same ``floor(log2)`` and the same ``X``.
  Not so for two's complement integers: ``int4:g32:e8m0`` maps a max of -30 to -7.5 -> -8 = -2**3,
  and the second pass doubles the scale (``test_floor_rule_with_full_range_int_is_not_idempotent``);
- ``:e8m0:ceil`` with integers: the max element rounds to ``> qmax / 2``, so ``ceil`` gives the
  same power of two again;
- fp32 scales for grids whose max is 1 (nf4, ternary, pow grids): ``s = amax`` exactly, the max
  maps to 1 and back to ``s``.

Other absmax specs with fp32 (or fp16) scales are idempotent up to an ulp of the scale
(``fl(fl(7 s) / 7)`` need not be ``s``), so they are checked with a relative tolerance. Idempotence
does not hold for MSE or percentile clipping, asymmetric ranges (the rebuilt minimum moves by up to
half a step), stochastic rounding, or scales that can round down far enough to clip the max (fp8
block scales of NVFP4).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mixq import QuantSpec, Rounding, dequantize, fake_quantize, quantize
from mixq.formats import ExponentFormat, FloatFormat, get
from mixq.quant import Grouping

SHAPES = st.sampled_from([(2, 32), (4, 64), (2, 2, 32)])


@st.composite
def tensors(draw, shapes=SHAPES) -> torch.Tensor:
    """Small fp32 tensors: values of many magnitudes, exact zeros, repeats, and a power-of-two
    overall scale; no magnitudes below 1e-6 (so that fp32 scales stay normal)."""
    shape = draw(shapes)
    elements = st.one_of(
        st.floats(-1e4, 1e4, width=32, allow_subnormal=False),
        st.sampled_from([0.0, 1.0, -1.0, 0.5, 6.0, -448.0, 7.0]),
    )
    a = draw(arrays(np.float32, shape, elements=elements))
    a = np.where(np.abs(a) < 1e-6, np.float32(0), a)
    k = draw(st.integers(-16, 16))
    return torch.from_numpy(a) * 2.0 ** k


def specs(*texts: str) -> list[QuantSpec]:
    return [QuantSpec.parse(t) for t in texts]  # parsed once: each property loops over its specs


EXACT = specs("mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8", "int4n:g32:e8m0",
              "int8n:channel:e8m0", "int4:g16:e8m0:ceil", "int3:g32:e8m0:ceil", "fp8_e4m3:g32:e8m0",
              "fp4_e2m1:channel:e8m0", "nf4:g32", "ternary:g16", "pow4_1.5:g32", "binary:g32")
APPROX = specs("int4", "int4:channel", "int8:g32", "int3:g16", "int4n:token", "fp8_e4m3", "fp8_e5m2:channel",
               "fp4_e2m1:g16", "fp6_e2m3:g32", "int4:g32:fp16", "int8:g32:bf16")
POW2_SCALED = EXACT[:12]
GRID = POW2_SCALED + specs("int4:g32", "nf4:g32:mse8_0.5", "int4:g32:asym", "nvfp4", "int4:g32:sr",
                           "fp4_e2m1:g16:p90", "int4:b2x16")
ODD = specs("int4:g32", "int8:channel", "fp8_e4m3", "fp4_e2m1:g16", "mxfp4", "mxint8", "nvfp4", "ternary:g32",
            "int4:g32:e8m0:ceil", "pow4_1.5:g32", "int4:g32:rtz", "fp8_e4m3:g32:mse8_0.5")
POW2_EQUIVARIANT = specs("int4:g32", "fp8_e4m3:channel", "mxfp4", "mxint8", "nvfp4", "nf4:g32",
                         "int4:g32:asym", "int4:g32:mse8_0.5", "fp4_e2m1:b2x16:e8m0")


@given(x=tensors())
def test_idempotent_exactly(x):
    for spec in EXACT:
        once = fake_quantize(x, spec)
        assert torch.equal(fake_quantize(once, spec), once), str(spec)


def test_floor_rule_with_full_range_int_is_not_idempotent():
    x = torch.tensor([[3.0] + [-30.0] * 31])
    once = fake_quantize(x, "int4:g32:e8m0")
    assert once[0, 1].item() == -32.0  # -30 / 4 = -7.5 -> -8, the most negative code
    assert fake_quantize(once, "int4:g32:e8m0")[0, 0].item() == 0.0  # scale 8 now: 4 / 8 = 0.5 -> 0


@given(x=tensors())
def test_idempotent_up_to_an_ulp_of_the_scale(x):
    for spec in APPROX:
        once = fake_quantize(x, spec)
        twice = fake_quantize(once, spec)
        assert torch.allclose(twice, once, rtol=1e-6, atol=0.0), str(spec)
        assert torch.equal(twice == 0, once == 0), str(spec)


@given(x=tensors())
def test_codes_are_grid_points_and_decode_to_fake_quantize(x):
    for spec in GRID:
        qt = quantize(x, spec, generator=torch.Generator().manual_seed(3))
        values = spec.format.decode(qt.codes)
        assert bool(torch.isin(values, spec.format.values()).all()), str(spec)
        assert torch.equal(spec.format.encode(values), qt.codes), str(spec)
        fq = fake_quantize(x, spec, generator=torch.Generator().manual_seed(3))
        assert torch.equal(dequantize(qt), fq), str(spec)
        if spec in POW2_SCALED:  # fake-quantized values themselves lie on the scaled grid
            grouping = Grouping(tuple(x.shape), spec.granularity)
            elements = grouping.to_groups(fq) / qt.scales[:, None]  # exact: scales are powers of two
            assert bool(torch.isin(elements, spec.format.values()).all()), str(spec)


@given(x=tensors())
def test_fake_quantize_is_odd(x):
    for spec in ODD:
        assert torch.equal(fake_quantize(-x, spec), -fake_quantize(x, spec)), str(spec)


@given(x=tensors(), k=st.integers(-8, 8))
def test_power_of_two_scaling_commutes(x, k):
    for spec in POW2_EQUIVARIANT:
        assert torch.equal(fake_quantize(x * 2.0 ** k, spec), fake_quantize(x, spec) * 2.0 ** k), str(spec)


# --- scalar formats ------------------------------------------------------------------------------

SCALAR = ["fp8_e4m3", "fp8_e5m2", "e4m3fnuz", "e5m2fnuz", "e4m3b11fnuz", "e3m4_ieee", "e4m3_ieee", "fp6_e3m2",
          "fp6_e2m3", "fp4_e2m1", "ue4m3", "ue5m3", "e3m2b5_nosub", "e3m0", "fp16", "bf16", "e8m0",
          "int2", "int4", "int8", "uint4", "int4n", "nf4", "ternary", "binary", "pow4_1.5",
          "grid(-1.0,-0.1,0.0,2.0)"]
ASYMMETRIC = {"int2", "int4", "int8", "uint4", "nf4", "binary", "ue4m3", "ue5m3", "e8m0",
              "grid(-1.0,-0.1,0.0,2.0)"}
FORMATS = [(name, get(name), get(name).values().double()) for name in SCALAR]
SYMMETRIC = [(name, fmt) for name, fmt, _ in FORMATS if name not in ASYMMETRIC]


def float_lists(min_size: int = 1):
    return st.lists(st.floats(width=32, allow_nan=False), min_size=min_size, max_size=64).map(
        lambda v: torch.tensor(v, dtype=torch.float32))


# positions inside a format's range, independent of the format: (where among the values, where
# between the two neighbours); the fraction hits the neighbours and their midpoint often
POSITIONS = st.lists(st.tuples(st.floats(0, 1), st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1))),
                     min_size=1, max_size=48)


def points_inside(values: torch.Tensor, positions: list[tuple[float, float]]) -> torch.Tensor:
    """fp32 points between neighbouring values, from format-independent positions."""
    n = values.numel()
    i = torch.tensor([min(int(a * (n - 1)), n - 2) for a, _ in positions])
    f = torch.tensor([b for _, b in positions], dtype=torch.float64)
    return (values[i] + f * (values[i + 1] - values[i])).float()


@pytest.mark.parametrize("rounding", [Rounding.NEAREST, Rounding.TOWARD_ZERO])
@given(y=float_lists(min_size=2))
def test_round_is_monotone(rounding, y):
    y = y.sort().values
    for name, fmt, _ in FORMATS:
        yy = y[y > 0] if isinstance(fmt, ExponentFormat) else y  # E8M0 has no zero or sign: NaN there
        r = fmt.round(yy, rounding)
        assert not bool(torch.isnan(r).any()), name
        assert bool((r[1:] >= r[:-1]).all()), (name, yy.tolist(), r.tolist())


def neighbours_of(values: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.searchsorted(values, y.double(), right=True).clamp(1, values.numel() - 1)
    return values[i - 1], values[i]


@given(positions=POSITIONS)
def test_round_to_nearest_error_is_at_most_half_the_local_step(positions):
    for name, fmt, v in FORMATS:
        y = points_inside(v, positions)
        y64 = y.double()
        lo, hi = neighbours_of(v, y)
        assert bool(((lo <= y64) & (y64 <= hi)).all()), name
        r = fmt.round(y).double()
        assert bool(((r == lo) | (r == hi)).all()), name
        assert bool(((r - y64).abs() <= (hi - lo) / 2).all()), (name, y.tolist(), r.tolist())
        t = fmt.round(y, Rounding.TOWARD_ZERO).double()
        nearer_zero = torch.where(hi.abs() < lo.abs(), hi, lo)
        on_grid = (y64 == lo) | (y64 == hi)
        assert bool(torch.where(on_grid, t == y64, t == nearer_zero).all()), name


@given(positions=POSITIONS, u=st.floats(0, 1, exclude_max=True))
def test_stochastic_rounding_picks_a_neighbour(positions, u):
    for name, fmt, v in FORMATS:
        y = points_inside(v, positions)
        uu = torch.full(y.shape, u, dtype=torch.float64)
        lo, hi = neighbours_of(v, y)
        r = fmt.round(y, Rounding.STOCHASTIC, uu).double()
        on_grid = torch.isin(y.double(), v)
        assert bool(torch.where(on_grid, r == y.double(), (r == lo) | (r == hi)).all()), name
        # u = 0 never moves away from the truncation: toward zero for sign-magnitude floats,
        # toward -inf for integers and grids
        floor = fmt.round(y, Rounding.STOCHASTIC, torch.zeros_like(uu)).double()
        trunc = torch.where(hi.abs() < lo.abs(), hi, lo) if isinstance(fmt, FloatFormat) else lo
        assert bool(torch.where(on_grid, floor == y.double(), floor == trunc).all()), name


@given(y=float_lists())
def test_round_is_symmetric(y):
    for name, fmt in SYMMETRIC:
        for mode in (Rounding.NEAREST, Rounding.TOWARD_ZERO):
            assert torch.equal(fmt.round(-y, mode), -fmt.round(y, mode)), name


@pytest.mark.parametrize("name,fmt", SYMMETRIC, ids=[n for n, _ in SYMMETRIC])
def test_saturation_is_symmetric(name, fmt):
    big = torch.tensor([math.inf, fmt.max * 1.01, fmt.max * 1.5, fmt.max * 4])
    assert fmt.round(big).tolist() == [fmt.max] * 4
    assert fmt.round(-big).tolist() == [-fmt.max] * 4


# --- stochastic rounding is unbiased -------------------------------------------------------------

N = 20_000


def neighbours(fmt, y: float) -> tuple[float, float]:
    v = fmt.values().double()
    i = int(torch.searchsorted(v, torch.tensor([y], dtype=torch.float64), right=True).clamp(1, v.numel() - 1))
    return float(v[i - 1]), float(v[i])


@pytest.mark.parametrize("name,y", [("int4", 2.3), ("int4", -0.9), ("int8", 100.01), ("fp4_e2m1", 2.6),
                                    ("fp4_e2m1", -0.1), ("fp8_e4m3", 300.0), ("fp8_e4m3", 0.001),
                                    ("nf4", 0.3), ("ternary", -0.25),
                                    ("e8m0", 3.0), ("e8m0", 1.1), ("fp6_e3m2", 13.0), ("pow4_1.5", 0.5)])
def test_stochastic_rounding_is_unbiased(name, y):
    fmt = get(name)
    y32 = float(torch.tensor(y, dtype=torch.float32))
    lo, hi = neighbours(fmt, y32)
    p = (y32 - lo) / (hi - lo)
    u = torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    r = fmt.round(torch.full((N,), y32), Rounding.STOCHASTIC, u).double()
    assert bool(((r == lo) | (r == hi)).all())
    sigma = (hi - lo) * math.sqrt(p * (1 - p) / N)
    assert abs(r.mean().item() - y32) <= 5 * sigma + 1e-12 * abs(y32)
    assert 0 < p < 1 and (r == hi).any() and (r == lo).any()


@pytest.mark.parametrize("spec,top,y", [("int4:sr", 7.0, 2.3), ("mxfp4:sr", 6.0, 2.6),
                                        ("int4:g32:sr", 7.0, -4.75),
                                        ("fp8_e4m3:sr", 448.0, 300.0), ("nf4:sr", 1.0, 0.3)])
def test_stochastic_fake_quantize_is_unbiased(spec, top, y):
    # groups of 32: one element fixes the scale at 1, the other 31 are y
    groups = N // 31
    x = torch.full((groups, 32), y)
    x[:, 0] = top
    fq = fake_quantize(x, spec, generator=torch.Generator().manual_seed(4))
    assert bool((fq[:, 0] == top).all())
    draws = fq[:, 1:].double().flatten()
    y32 = float(torch.tensor(y, dtype=torch.float32))
    lo, hi = neighbours(QuantSpec.parse(spec).format, y32)
    p = (y32 - lo) / (hi - lo)
    assert bool(((draws == lo) | (draws == hi)).all())
    sigma = (hi - lo) * math.sqrt(p * (1 - p) / draws.numel())
    assert abs(draws.mean().item() - y32) <= 5 * sigma
    # and reproducible from the generator's seed
    again = fake_quantize(x, spec, generator=torch.Generator().manual_seed(4))
    assert torch.equal(fq, again)
