"""The compiled kernels are a derived fast path: they must equal the torch reference bit for bit."""

import pytest
import torch

import mixq
from mixq.quant import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba not installed")

SPECS = [
    "int4:g64", "int4:g64:asym", "int8:channel", "int4:g32:asym:sr", "int4:g32:rtz", "uint4:g32",
    "fp8_e4m3", "fp8_e4m3:channel:sr", "fp8_e5m2:g32:rtz", "e4m3_nosat:g32", "fp8_e4m3fnuz:g32",
    "mxfp4", "mxfp4:sr", "mxfp4:rtz", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e5m2", "mxint8",
    "nvfp4", "nvfp4:sr", "nvint4", "nf4:g64", "nf4:g64:sr", "nf4:g64:rtz", "ternary:channel",
    "pow4_1.5:g32", "grid(-1.0,-0.3,0.0,0.5,1.0):g16", "e3m0:g32", "e3m0:g32:sr", "e2m2_nosub:g32",
    "e2m2_nosub:g32:sr", "ue4m3:g32", "e5m2b20_nosub:g32", "fp16", "bf16:channel", "fp32",
    "int4:g64:mse", "mxfp4:mse", "int8:token:p99", "e4m3:b16x16:e8m0:ceil",
]


def _nasty(rows: int = 96, cols: int = 512) -> torch.Tensor:
    """Values over 12 decades, exact zeros, a NaN, an inf, fp32 subnormals and negative zeros."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 6, cols)
    x[3, 5] = float("nan")
    x[7, 100] = float("inf")
    x[9, :] = 0.0
    x[10, :] = -0.0
    x[11, 3] = 1e-41
    x[12, :64] = torch.randn(64, generator=g) * 1e-39
    return x


@pytest.mark.parametrize("spec", SPECS)
def test_numba_equals_reference(spec: str) -> None:
    x = _nasty()
    ref = mixq.fake_quantize(x, spec, backend="torch", generator=torch.Generator().manual_seed(7))
    fast = mixq.fake_quantize(x, spec, backend="numba", generator=torch.Generator().manual_seed(7))
    same = (ref == fast) | (torch.isnan(ref) & torch.isnan(fast))
    assert bool(same.all()), f"{int((~same).sum())} elements differ, first at {(~same).nonzero()[0].tolist()}"
    assert torch.isnan(ref).any()  # the NaN/inf groups really went through both paths


def test_long_rows_are_split_for_threads_and_stay_equal() -> None:
    x = torch.randn(4, 1 << 14, generator=torch.Generator().manual_seed(1))
    for spec in ("fp8_e4m3:channel", "int8:channel:sr", "nf4"):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(mixq.fake_quantize(x, spec, backend="torch", generator=g1),
                           mixq.fake_quantize(x, spec, backend="numba", generator=g2))


def test_auto_backend_skips_kernels_for_small_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a small tensor must not reach the compiled kernels")

    monkeypatch.setattr(kernels, "_k", refuse)
    mixq.fake_quantize(torch.randn(8, 64), "mxfp4")  # below MIN_NUMEL: reference path only


def test_other_float_dtypes_are_computed_in_fp32_and_returned_in_their_dtype() -> None:
    x = torch.randn(64, 64, dtype=torch.float64)
    fast = mixq.fake_quantize(x, "mxfp4", backend="numba")
    assert fast.dtype == torch.float64
    assert torch.equal(fast, mixq.fake_quantize(x.float(), "mxfp4", backend="torch").double())


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("spec", ["mxfp4", "int8:channel", "fp8_e4m3", "nf4:g64", "int4:b16x16"])
def test_out_receives_the_same_result(spec: str, backend: str) -> None:
    x = _nasty()
    out = torch.full_like(x, 7.0)
    y = mixq.fake_quantize(x, spec, backend=backend, out=out)
    ref = mixq.fake_quantize(x, spec, backend="torch")
    assert y is out
    assert bool(((out == ref) | (torch.isnan(out) & torch.isnan(ref))).all())


def test_out_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="out must match"):
        mixq.fake_quantize(torch.randn(4, 8), "int8", out=torch.empty(8, 4))


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        mixq.fake_quantize(torch.randn(4, 8), "int8", backend="nmba")


@pytest.mark.parametrize("spec", ["int4:g64:asym", "int8:channel", "mxfp4", "fp8_e4m3:g32"])
def test_ranges_that_overflow_fp32_agree(spec: str) -> None:
    x = torch.randn(96, 512, generator=torch.Generator().manual_seed(2))
    x[5, :2] = torch.tensor([3e38, -3e38])  # hi - lo overflows to inf
    ref = mixq.fake_quantize(x, spec, backend="torch")
    fast = mixq.fake_quantize(x, spec, backend="numba")
    assert bool(((ref == fast) | (torch.isnan(ref) & torch.isnan(fast))).all())


def test_first_kernel_launch_keeps_torch_thread_count():
    """numba's first parallel launch used to reset torch's thread pool (1 -> all cores); it must not."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1); from mixq.quant import fake_quantize; "
            "fake_quantize(torch.randn(512, 512), 'int4:g64', backend='numba'); print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
