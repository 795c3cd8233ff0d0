"""The oneDNN u8 x s8 backend of ``PackedLinearW8A8``: exact accumulators, routing, storage.

Oracle: an int64 matmul of the integer codes. Every backend (``onednn``, ``fp32_exact``, ``int_mm``)
must return that accumulator bit for bit, including the extreme codes (7-bit activations -64 / 63 with
int8 weights -128 / 127; 8-bit activations -128 / 127 with 7-bit weights -64 / 63) and K long enough to
need several oneDNN chunks (|acc| > 2**24 in total). 8-bit activations with 8-bit weights are never
routed to oneDNN: on CPUs without VNNI its int16 pair sums saturate (shown below).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mixq.export.layers import QuantizedLayer
from mixq.model.packed import packed_bytes
from mixq.quant import QuantSpec, dequantize, fake_quantize, quantize
from mixq.runtime import tiles
from mixq.runtime.linear import PackedLinearW8A8, supports

Q = QuantSpec.parse
pytestmark = pytest.mark.skipif(not tiles.onednn_available(), reason="oneDNN int8 linear not available")


def _module(inputs: str = "int7:token", out: int = 48, inn: int = 128, seed: int = 0,
            weights: str = "int8:channel", **kw):
    g = torch.Generator().manual_seed(seed)
    W, b = torch.randn(out, inn, generator=g), torch.randn(out, generator=g) * 0.1
    qt = quantize(W, weights)
    layer = QuantizedLayer("l", qt, Q(inputs))
    assert supports(layer) == "w8a8"
    return PackedLinearW8A8.from_layer(layer, b, **kw), dequantize(qt), b


def _extreme_codes(M: int, N: int, K: int, lo: int, hi: int, seed: int,
                   w_lo: int = -128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xq = torch.randint(lo, hi + 1, (M, K), generator=g, dtype=torch.int8)
    wq = torch.randint(w_lo, -w_lo, (N, K), generator=g, dtype=torch.int8)
    xq[0], wq[0] = lo, w_lo  # the largest positive product everywhere: |acc| = K * |lo| * |w_lo|
    if M > 1:
        xq[1] = hi
    if N > 1:
        wq[1] = -w_lo - 1
    if M > 2:  # near-extreme rows: every int16 pair sum close to the limit, odd totals
        xq[2] = torch.randint(hi - 6, hi + 1, (K,), generator=g, dtype=torch.int8)
    if N > 2:
        wq[2] = torch.randint(-w_lo - 8, -w_lo, (K,), generator=g, dtype=torch.int8)
    return xq, wq


@pytest.mark.parametrize(("M", "K", "bits", "w_bits"), [
    (1, 576, 7, 8), (3, 1536, 7, 8), (17, 2048, 7, 8), (16, 4100, 7, 8), (5, 4096, 6, 8), (2, 9000, 6, 8),
    (64, 320, 5, 8), (1, 576, 8, 7), (17, 2048, 8, 7), (16, 4100, 8, 7), (3, 1536, 8, 6)])
def test_every_backend_gives_the_int64_accumulator(M: int, K: int, bits: int, w_bits: int) -> None:
    lo, hi, w_lo = -(1 << (bits - 1)), (1 << (bits - 1)) - 1, -(1 << (w_bits - 1))
    xq, wq = _extreme_codes(M, 24, K, lo, hi, seed=M * K, w_lo=w_lo)
    exact = xq.long() @ wq.long().t()  # [M, 24]
    assert tiles.onednn_fits(lo, hi, -w_lo)
    w = tiles.OneDNNWeight(wq, tiles.onednn_chunk(-lo, -w_lo))
    assert len(w.parts) == -(-K // tiles.onednn_chunk(-lo, -w_lo))
    got = {"onednn": w.matmul_u8(tiles.u8_from_codes(xq, -lo), -lo),
           **{b: tiles.int_matmul(xq, wq, b) for b in tiles.INT_BACKENDS}}
    for name, acc in got.items():
        assert acc.dtype == torch.int32 and torch.equal(acc.long(), exact), name
    # the fp32 form is float(acc): exact integers per chunk, the same value as the int32's conversion
    assert torch.equal(w.matmul_u8(tiles.u8_from_codes(xq, -lo), -lo, torch.float32),
                       exact.to(torch.int32).float())
    assert torch.equal(w.codes(), wq)  # the plain codes rebuild exactly from the prepacked copy


def test_chunk_and_pair_bounds() -> None:
    assert tiles.onednn_chunk(64, 128) == 2048 and tiles.onednn_chunk(32, 128) == 4096
    assert tiles.onednn_chunk(128, 64) == 2048
    assert tiles.onednn_fits(-64, 63) and not tiles.onednn_fits(-128, 127) and not tiles.onednn_fits(-127, 127)
    assert tiles.onednn_fits(-128, 127, 64) and not tiles.onednn_fits(-128, 127, 65)
    assert tiles.onednn_fits(-64, 63, 128) and not tiles.onednn_fits(-64, 64, 128)


def _has_vnni() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return "vnni" in flags or "amx" in flags


def test_8bit_activations_saturate_in_onednn_so_they_are_never_routed_there() -> None:
    # the hazard itself: u8 activations up to 255 (8-bit codes + 128) times -128 weights overflow int16
    # pair sums in vpmaddubsw; documented here on machines without VNNI/AMX
    K, N = 256, 16
    xq = torch.full((4, K), 127, dtype=torch.int8)
    wq = torch.full((N, K), -128, dtype=torch.int8)
    exact = (xq.long() @ wq.long().t()).double()
    if torch.backends.cpu.get_cpu_capability() == "AVX2" and not _has_vnni():
        p = torch.ops.onednn.qlinear_prepack(wq, None)
        xu = (xq.to(torch.int16) + 128).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, p, torch.ones(N), torch.zeros(N, dtype=torch.int64),
                                               None, 1.0, 0, torch.float32, "none", [], "")
        assert not torch.equal(y.double(), exact)  # saturated: wrong
    # the module never sends 8-bit codes there, whatever the size
    m, _, _ = _module("int8:token")
    assert m.onednn is None and m.weight_codes is not None
    assert {m.route(r) for r in (1, 16, 4096)} == {"fp32_exact"}
    with pytest.raises(ValueError, match="7-bit inputs"):
        _module("int8:token", backend="onednn")
    with pytest.raises(ValueError, match="saturate"):
        m.int_accumulator(torch.full((2, 128), -128, dtype=torch.int8), "onednn")


def test_8bit_activations_with_7bit_weights_run_on_onednn_exactly() -> None:
    x = torch.randn(3, 40, 128) * torch.rand(3, 40, 1) * 4
    m, Wq, b = _module("int8:token", weights="int7:channel")
    assert m.onednn is not None and m.route(64) == "onednn"
    ref_m, _, _ = _module("int8:token", weights="int7:channel", backend="fp32_exact")
    with torch.no_grad():
        assert torch.equal(m(x), ref_m(x))
    xq = torch.full((2, 128), -128, dtype=torch.int8)
    assert torch.equal(m.int_accumulator(xq, "onednn"), m.int_accumulator(xq, "fp32_exact"))


@pytest.mark.parametrize("inputs", ["int7:token", "int6:token"])
def test_module_outputs_identical_across_backends(inputs: str) -> None:
    x = torch.randn(2, 20, 128) * torch.rand(2, 20, 1) * 4
    outs = {}
    with torch.no_grad():
        for backend in ("auto", "onednn", "fp32_exact", "int_mm"):
            m, Wq, b = _module(inputs, backend=backend)
            assert (m.onednn is not None) == (backend in ("auto", "onednn"))
            outs[backend] = m(x)
    for backend, y in outs.items():
        assert torch.equal(y, outs["fp32_exact"]), backend
    xf = fake_quantize(x, inputs)
    ref = nn.functional.linear(xf, Wq, b)
    assert ((outs["auto"] - ref).abs() <= 1e-5 * (xf.abs() @ Wq.abs().t()) + 1e-30).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e30, 1e30), min_size=8, max_size=8), st.floats(1e-30, 1e30),
       st.sampled_from(["int7:token", "int6:token"]))
def test_narrow_input_codes_equal_reference(values, mult, inputs) -> None:
    m, _, _ = _module(inputs)
    x = torch.tensor(values, dtype=torch.float32).repeat(16).reshape(1, 128) * mult
    if not torch.isfinite(x).all():
        return
    xq, sx = m.quantize_input(x)
    xr, sr = m.quantize_input_reference(x)
    assert torch.equal(xq, xr) and torch.equal(sx, sr)
    assert torch.equal(xq.float() * sx[:, None], fake_quantize(x, inputs))


def test_storage_is_the_prepacked_copy_only() -> None:
    m, Wq, _ = _module()
    codes = torch.round(Wq / m.weight_scale[:, None]).to(torch.int8)
    assert m.weight_codes is None and torch.equal(m.int_weight(), codes)
    assert m.opaque_bytes() == 48 * 128
    held = sum(t.untyped_storage().nbytes() for t in m.buffers())  # scales + bias
    assert packed_bytes(m) == held + 48 * 128
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = m(x)
        assert torch.equal(copy.deepcopy(m)(x), y)
        clone = pickle.loads(pickle.dumps(m))
        assert torch.equal(clone(x), y)
        state = m.state_dict()
        assert torch.equal(state["weight_codes"], codes)
        other, _, _ = _module(seed=1)
        other.load_state_dict(state)
        assert torch.equal(other(x), y) and other.weight_codes is None
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), y)


def test_min_rows_keeps_codes_for_small_batches() -> None:
    m, _, _ = _module(onednn_min_rows=16)
    assert m.weight_codes is not None and m.onednn is not None
    assert m.route(1) == m.route(15) == "fp32_exact" and m.route(16) == "onednn"
    x = torch.randn(20, 128)
    with torch.no_grad():
        assert torch.equal(m(x[:3]), _module(backend="fp32_exact")[0](x[:3]))
        assert torch.equal(m(x), _module()[0](x))


def test_fallback_without_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiles, "onednn_available", lambda: False)
    m, _, _ = _module()
    assert m.onednn is None and m.route(256) == "fp32_exact" and m.weight_codes is not None
    with pytest.raises(RuntimeError, match="not available"):
        _module(backend="onednn")
