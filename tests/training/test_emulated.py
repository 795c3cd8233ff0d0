"""Emulated low-precision linear: exactness against autograd and against fake_quantize oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixq.algorithms.hadamard import block_hadamard, random_signs
from mixq.quant import fake_quantize
from mixq.training import (RECIPES, ROLES, DelayedScaling, EmulatedLinear, GemmFormats, PredictedScaling,
                           ScalingState, delayed_quantize, formats_for, predicted_quantize, quantized_linear, recipe)


def _grads(fn, x, W, b, g):
    """Output and gradients of ``fn(x, W, b)`` for the output gradient ``g``."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, W, b)]
    y = fn(*leaves)
    y.backward(g)
    return y.detach(), *[t.grad if t is not None else None for t in leaves]


def _data(shape, out, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    W = torch.randn(out, shape[-1], generator=gen) / shape[-1] ** 0.5
    b = torch.randn(out, generator=gen) if bias else None
    g = torch.randn(*shape[:-1], out, generator=gen)
    return x, W, b, g


def _fq(t, spec, **kw):
    return t if spec is None else fake_quantize(t, spec, **kw)


@pytest.mark.parametrize("formats", [GemmFormats(), recipe("fp32"), GemmFormats.of("fp32", "fp32")],
                         ids=["none", "recipe", "fp32-specs"])
@pytest.mark.parametrize("shape", [(8, 32), (2, 16, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_full_precision_equals_autograd_exactly(formats, shape, bias):
    x, W, b, g = _data(shape, 24, bias)
    ours = _grads(lambda x, W, b: quantized_linear(x, W, b, formats), x, W, b, g)
    ref = _grads(F.linear, x, W, b, g)
    for a, r in zip(ours, ref):
        assert (a is None and r is None) or torch.equal(a, r)


@pytest.mark.parametrize("name", ["fp8", "mxfp8", "mxfp4", "nvfp4", "int8"])
def test_forward_is_matmul_of_fake_quantized_operands(name):
    f = recipe(name)
    x, W, b, _ = _data((2, 32, 64), 32)
    y = quantized_linear(x, W, b, f)
    X = x.reshape(-1, 64)
    expected = F.linear(_fq(X, f.input), _fq(W, f.weight), b).reshape(2, 32, 32)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("name", ["fp8", "mxfp8", "int8"])
def test_backward_gemms_use_reduction_last_operands(name):
    f = recipe(name)
    x, W, b, g = _data((64, 32), 32)
    _, dx, dw, db = _grads(lambda x, W, b: quantized_linear(x, W, b, f), x, W, b, g)
    assert torch.equal(dx, _fq(g, f.grad_output) @ _fq(W.t(), f.dgrad_weight).t())
    assert torch.equal(dw, _fq(g.t(), f.wgrad_grad_output) @ _fq(x.t(), f.wgrad_input).t())
    assert torch.equal(db, g.sum(0))


def test_nvfp4_backward_with_rht_and_sr_matches_oracle():
    f = recipe("nvfp4", seed=5)
    x, W, b, g = _data((32, 64), 48)
    gen = torch.Generator().manual_seed(123)
    _, dx, dw, _ = _grads(lambda x, W, b: quantized_linear(x, W, b, f, generator=gen), x, W, b, g)
    oracle_gen = torch.Generator().manual_seed(123)  # same draws, same order: dgrad dY, then wgrad dY
    dYq = fake_quantize(g, "nvfp4:sr", generator=oracle_gen)
    assert torch.equal(dx, dYq @ fake_quantize(W.t(), "nvfp4:b16x16").t())
    signs = random_signs(32, 5)
    A = fake_quantize(block_hadamard(g.t(), 16, signs), "nvfp4:sr", generator=oracle_gen)
    B = fake_quantize(block_hadamard(x.t(), 16, signs), "nvfp4")
    assert torch.equal(dw, A @ B.t())


def test_hadamard_on_wgrad_leaves_full_precision_gradients_unchanged():
    x, W, b, g = _data((2, 16, 32), 24)
    ref = _grads(F.linear, x, W, b, g)
    rht = GemmFormats(hadamard_wgrad=16, seed=3)
    ours = _grads(lambda x, W, b: quantized_linear(x, W, b, rht), x, W, b, g)
    assert torch.equal(ours[1], ref[1]) and torch.equal(ours[3], ref[3])  # dX and db untouched
    assert torch.allclose(ours[2], ref[2], rtol=1e-5, atol=1e-5 * ref[2].abs().max().item())
    with pytest.raises(ValueError, match="token count divisible"):
        _grads(lambda x, W, b: quantized_linear(x, W, b, rht), x[:, :5], W, b, g[:, :5])


def _sr_mean_and_se(f, x, W, g, runs):
    gen = torch.Generator().manual_seed(0)
    samples = [_grads(lambda x, W, b: quantized_linear(x, W, b, f, generator=gen), x, W, None, g)[1:3]
               for _ in range(runs)]
    out = []
    for k in range(2):
        s = torch.stack([p[k] for p in samples]).double()
        out.append((s.mean(0), s.std(0) / runs ** 0.5))
    return out


def test_stochastic_rounding_on_gradients_is_unbiased():
    # int4 per tensor with amax 7: the scale is exactly 1, and every dY sits 0.3 above an integer,
    # so round to nearest is biased by -0.3 per entry while stochastic rounding is not.
    gen = torch.Generator().manual_seed(1)
    g = (torch.randint(-6, 6, (16, 8), generator=gen) + 0.3).float()
    g[0, 0] = 7.0
    x = torch.randn(16, 8, generator=gen)
    W = torch.randn(8, 8, generator=gen)
    exact_dx, exact_dw = (g @ W).double(), (g.t() @ x).double()
    sr = GemmFormats(grad_output="int4:sr", wgrad_grad_output="int4:sr")
    (mx, sx), (mw, sw) = _sr_mean_and_se(sr, x, W, g, runs=400)
    assert ((mx - exact_dx).abs() <= 4.5 * sx + 1e-9).all()
    assert ((mw - exact_dw).abs() <= 4.5 * sw + 1e-9).all()
    _, dx_rne, dw_rne, _ = _grads(lambda x, W, b: quantized_linear(
        x, W, b, GemmFormats(grad_output="int4", wgrad_grad_output="int4")), x, W, None, g)
    assert (dx_rne.double() - exact_dx).abs().max() > 10 * sx.max()  # the test can tell a biased rounding


@pytest.mark.parametrize("weight, same", [("nvfp4:b16x16", True), ("nvfp4", False)])
def test_2d_weight_blocks_give_forward_and_dgrad_the_same_weight(weight, same):
    f = GemmFormats(weight=weight, dgrad_weight=weight)
    _, W, _, _ = _data((4, 64), 32)
    seen = {}
    x = torch.eye(64, requires_grad=True)  # y = I Q(W)^T = Q(W)^T
    y = quantized_linear(x, W, None, f, observer=lambda role, t: seen.setdefault(role, t))
    y.backward(torch.zeros(64, 32))
    assert torch.equal(seen["dgrad_weight"].t(), seen["weight"]) == same
    # black box: dX for dY = I is the dgrad weight itself
    x2 = torch.eye(32, 64).requires_grad_(True)
    quantized_linear(x2, W, None, f).backward(torch.eye(32))
    assert torch.equal(x2.grad, y.detach().t()) == same


def _e4m3_oracle(t, amax):
    s = torch.tensor(float(amax)) / 448.0
    return (t / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


def test_delayed_scaling_uses_the_history_max():
    state = ScalingState(DelayedScaling(history=3), ["input"])
    gen = torch.Generator().manual_seed(0)

    def tensor(amax):
        t = torch.rand(64, generator=gen) * amax * 0.9
        t[0] = amax
        return t

    first = tensor(1.0)
    assert torch.equal(delayed_quantize(first, recipe("fp8").input, state, "input"),
                       fake_quantize(first, "fp8_e4m3"))  # empty history: current scaling
    spec = recipe("fp8").input
    for amax in (4.0, 2.0):
        delayed_quantize(tensor(amax), spec, state, "input")
    t = tensor(0.5)  # history [1, 4, 2] -> scale from 4
    assert torch.equal(delayed_quantize(t, spec, state, "input"), _e4m3_oracle(t, 4.0))
    t = tensor(10.0)  # history [0.5, 4, 2]: still 4, and 10 saturates to the largest e4m3 value
    out = delayed_quantize(t, spec, state, "input")
    assert torch.equal(out, _e4m3_oracle(t, 4.0)) and out[0] == 448.0 * (torch.tensor(4.0) / 448.0)
    t = tensor(1.0)  # history [0.5, 10, 2] (4 dropped out): scale from 10
    assert torch.equal(delayed_quantize(t, spec, state, "input"), _e4m3_oracle(t, 10.0))
    assert state.history("input").tolist() == [0.5, 10.0, 1.0]


def test_emulated_linear_delayed_scaling_state():
    lin = torch.nn.Linear(32, 16)
    m = EmulatedLinear(lin, recipe("fp8"), delayed=DelayedScaling(history=4))
    assert set(m.scaling.roles) == set(ROLES)
    x1, x2 = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32) * 0.1
    m(x1).sum().backward()
    y2 = m(x2)
    X2q = _e4m3_oracle(x2, x1.detach().abs().max())  # step 2's input uses step 1's amax
    Wq = _e4m3_oracle(lin.weight.detach(), lin.weight.detach().abs().max())
    assert torch.equal(y2, F.linear(X2q, Wq, lin.bias))
    assert int(m.state_dict()["scaling.steps_grad_output"]) == 1
    assert m.to_linear().weight is lin.weight
    with pytest.raises(ValueError, match="per-tensor"):
        state = ScalingState(DelayedScaling(), ["x"])
        delayed_quantize(torch.randn(4, 32), recipe("mxfp4").input, state, "x")


def test_predicted_weight_scaling_bounds_the_amax_between_refreshes():
    u, refresh = 0.01, 5
    state = ScalingState(None, [], PredictedScaling(max_update=u, refresh=refresh), ["weight"])
    spec = recipe("fp8").weight
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=gen)
    for call in range(12):
        exact_amax = W.abs().max()
        out = predicted_quantize(W, spec, state, "weight")
        k = call % refresh  # calls since the last exact amax
        if k == 0:  # first call and every `refresh` calls: plain current scaling
            assert torch.equal(out, fake_quantize(W, spec))
        else:
            predicted = state.ref_weight + k * u
            assert predicted >= exact_amax  # the bound holds: nothing saturates
            assert torch.equal(out, _e4m3_oracle(W, predicted))
        step = (torch.rand(W.shape, generator=gen) * 2 - 1) * u  # an update of at most u per weight
        W = W + step
    assert int(state.since_weight) == 12 % refresh or int(state.since_weight) == refresh


def test_emulated_linear_predicted_scaling_only_for_weight_roles():
    lin = torch.nn.Linear(32, 16)
    m = EmulatedLinear(lin, recipe("fp8"), delayed=DelayedScaling(history=4),
                       predicted=PredictedScaling(max_update=1e-3))
    assert set(m.scaling.predicted_roles) == {"weight", "dgrad_weight"}
    assert set(m.scaling.roles) == set(ROLES) - {"weight", "dgrad_weight"}
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for _ in range(3):  # inputs that need a gradient, so dgrad runs too
        m(torch.randn(8, 32, requires_grad=True)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert int(m.state_dict()["scaling.since_weight"]) == 3 and int(m.scaling.since_dgrad_weight) == 3
    block = EmulatedLinear(torch.nn.Linear(64, 16), recipe("mxfp8"), predicted=PredictedScaling(max_update=1e-3))
    assert block.scaling is None  # block formats keep their per-block current scales
    with pytest.raises(ValueError, match="max_update"):
        PredictedScaling(max_update=-1.0)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_trains_a_step(name):
    torch.manual_seed(0)
    m = EmulatedLinear(torch.nn.Linear(64, 32), recipe(name))
    x = torch.randn(2, 16, 64)
    loss = m(x).square().mean()
    loss.backward()
    assert torch.isfinite(m.weight.grad).all() and m.weight.grad.abs().sum() > 0


def test_recipe_names_and_overrides():
    with pytest.raises(KeyError, match="nvfp4"):
        recipe("nvfp5")
    assert recipe("NVFP4").weight == recipe("nvfp4").dgrad_weight
    assert recipe("fp8").grad_output.format.name == recipe("fp8").wgrad_grad_output.format.name != \
        recipe("fp8").input.format.name
    overrides = [("lm_head", None), ("*.mlp.*", "fp8")]
    assert formats_for("lm_head", "nvfp4", overrides) is None
    assert formats_for("layers.0.mlp.up", "nvfp4", overrides) == recipe("fp8")
    assert formats_for("layers.0.attn.q", recipe("nvfp4"), overrides) == recipe("nvfp4")
    with pytest.raises(ValueError, match="hadamard_wgrad"):
        GemmFormats(hadamard_wgrad=3)
    with pytest.raises(TypeError, match="unknown GemmFormats fields"):
        recipe("fp8").with_(grad="fp8_e5m2")
