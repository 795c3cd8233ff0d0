"""Optimizers on a quantization grid: ECO, SR updates, naive rounding, master weights."""

from __future__ import annotations

import pytest
import torch

from mixq.quant import QuantSpec, SpecError, fake_quantize
from mixq.training.optim import ECO, MasterWeights, NaiveQuantized, SRUpdate, state_bytes, state_shapes

INT4 = "int4n:g32:e8m0"  # power-of-two scales: fake_quantize is exactly idempotent (tests/quant)
GRID_SPECS = [INT4, "mxfp4"]
NO_MASTER = [ECO, SRUpdate, NaiveQuantized]


def least_squares(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X [256, 32], Y = X W*^T [256, 8], and a random start W0 [8, 32] (fp32)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 32, generator=g)
    W_star = torch.randn(8, 32, generator=g)
    return X, X @ W_star.T, torch.randn(8, 32, generator=g)


def loss_of(W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return ((X @ W.T - Y) ** 2).mean()


def train(opt_cls, spec, lr: float, steps: int = 100, rule: str = "sgd", on_step=None) -> float:
    X, Y, W0 = least_squares()
    W = torch.nn.Parameter(W0 if spec is None else fake_quantize(W0, spec.replace(":sr", "")))
    opt = opt_cls([W], lr=lr, spec=spec, rule=rule, momentum=0.9, seed=0)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(W, X, Y).backward()
        opt.step()
        if on_step is not None:
            on_step(W, opt)
    return loss_of(W.detach(), X, Y).item()


@pytest.mark.parametrize("opt_cls", [ECO, SRUpdate, NaiveQuantized, MasterWeights])
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_without_a_grid_every_optimizer_is_torchs(opt_cls, rule):
    X, Y, W0 = least_squares()
    W, W_ref = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt = opt_cls([W], lr=0.01, spec=None, rule=rule, momentum=0.9, weight_decay=0.01)
    ref = (torch.optim.SGD([W_ref], lr=0.01, momentum=0.9, weight_decay=0.01) if rule == "sgd"
           else torch.optim.Adam([W_ref], lr=0.01, weight_decay=0.01))
    for _ in range(5):
        for o, w in ((opt, W), (ref, W_ref)):
            o.zero_grad()
            loss_of(w, X, Y).backward()
            o.step()
    torch.testing.assert_close(W.detach(), W_ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt_cls", NO_MASTER)
@pytest.mark.parametrize("rule,keys", [("sgd", {"momentum"}), ("adam", {"exp_avg", "exp_avg_sq"})])
def test_state_holds_moments_only_without_master(opt_cls, rule, keys):
    W = torch.nn.Parameter(fake_quantize(torch.randn(8, 32), INT4))
    opt = opt_cls([W], lr=0.01, spec=INT4, rule=rule)
    (W**2).sum().backward()
    opt.step()
    shapes = state_shapes(opt)
    assert set(shapes) == keys
    assert all(s == [(8, 32)] for s in shapes.values())
    assert state_bytes(opt) == len(keys) * W.numel() * 4


def test_master_weights_hold_an_fp32_copy():
    W = torch.nn.Parameter(fake_quantize(torch.randn(8, 32), INT4))
    opt = MasterWeights([W], lr=0.01, spec=INT4)
    (W**2).sum().backward()
    opt.step()
    assert state_shapes(opt) == {"momentum": [(8, 32)], "master": [(8, 32)]}
    assert state_bytes(opt) == 2 * W.numel() * 4
    assert torch.equal(W.detach(), fake_quantize(opt.state[W]["master"], INT4))


@pytest.mark.parametrize("opt_cls,spec", [(ECO, INT4), (ECO, INT4 + ":sr"), (SRUpdate, "mxfp4"),
                                          (NaiveQuantized, "mxfp4"), (ECO, "mxfp4")])
def test_params_stay_on_the_grid_after_every_step(opt_cls, spec):
    nearest = spec.replace(":sr", "")

    def on_grid(W, opt):
        assert torch.equal(fake_quantize(W.detach(), nearest), W.detach())

    train(opt_cls, spec, lr=0.01, steps=20, on_step=on_grid)


def test_eco_keeps_the_virtual_master_on_the_sgd_path():
    """With m <- m - (1-b)/(lr b) e, z = w - lr b/(1-b) m moves as SGD: z' = z - lr/(1-b) grad(w)."""
    lr, beta = 0.01, 0.9
    X, Y, W0 = least_squares()
    W = torch.nn.Parameter(fake_quantize(W0, INT4))
    opt = ECO([W], lr=lr, spec=INT4, momentum=beta)
    z = W.detach().clone()  # m = 0 before the first step
    for _ in range(30):
        opt.zero_grad()
        loss_of(W, X, Y).backward()
        z = z - lr / (1 - beta) * W.grad
        opt.step()
        z_eco = W.detach() - lr * beta / (1 - beta) * opt.state[W]["momentum"]
        torch.testing.assert_close(z_eco, z, rtol=0, atol=1e-4)


def test_sr_update_is_unbiased_and_naive_rounds_it_away():
    """Grid step 0.5 (group max 3.5): a step from 1.0 to 0.9 lands 0.9 on average with SR, 1.0 with RNE."""
    W0 = torch.full((128, 32), 1.0)
    W0[:, 0] = 3.5
    grad = torch.ones_like(W0)
    grad[:, 0] = 0.0
    means = {}
    for opt_cls in (SRUpdate, NaiveQuantized):
        W = torch.nn.Parameter(W0.clone())
        opt = opt_cls([W], lr=0.1, spec=INT4, momentum=0.0, seed=3)
        W.grad = grad.clone()
        opt.step()
        assert set(W[:, 1:].unique().tolist()) <= {0.5, 1.0}
        means[opt_cls] = W[:, 1:].mean().item()
    se = 0.5 * (0.2 * 0.8) ** 0.5 / (128 * 31) ** 0.5
    assert abs(means[SRUpdate] - 0.9) < 4 * se
    assert means[NaiveQuantized] == 1.0


def test_sr_is_reproducible_from_its_seed():
    runs = [train(SRUpdate, INT4, lr=0.01, steps=10) for _ in range(2)]
    assert runs[0] == runs[1]


def test_small_least_squares_comparison():
    """int4 weights, SGD momentum 0.9, lr 0.01, 100 steps: naive stalls, SR and ECO do not."""
    start = train(NaiveQuantized, INT4, lr=0.01, steps=0)
    loss = {name: train(cls, spec, lr=0.01) for name, cls, spec in [
        ("naive", NaiveQuantized, INT4), ("sr", SRUpdate, INT4), ("eco", ECO, INT4),
        ("eco_sr", ECO, INT4 + ":sr"), ("master", MasterWeights, INT4)]}
    assert loss["naive"] > 0.9 * start  # every update rounds away
    for name in ("sr", "eco", "eco_sr", "master"):
        assert loss[name] < 0.2 * loss["naive"], loss
    assert loss["master"] <= min(loss["sr"], loss["eco"], loss["eco_sr"]), loss
    assert loss["eco_sr"] < loss["eco"], loss


def test_bad_arguments_are_named():
    W = torch.nn.Parameter(torch.zeros(4, 32))
    with pytest.raises(ValueError, match="0 < beta < 1"):
        ECO([W], lr=0.1, spec=INT4, momentum=0.0)
    with pytest.raises(ValueError, match="rule must be one of"):
        SRUpdate([W], lr=0.1, spec=INT4, rule="lion")
    with pytest.raises(SpecError):
        NaiveQuantized([W], lr=0.1, spec="int4:bogus")


def test_grid_optimizers_put_conv_weights_on_the_grid_in_their_matrix_view():
    from mixq.training.loop import make_optimizer
    from mixq.training.optim import grid_quantize
    from mixq.training.tasks import get_task

    model = get_task("tiny-cnn").build_model(0)
    conv = model.conv2.weight  # [32, 32, 3, 3]: blocks of 32 along in*kh*kw = 288
    opt, notes = make_optimizer(model, "eco", 1e-3, weight_format="mxfp4", keep=())
    assert not any("conv2" in n for n in notes)
    matrix = conv.detach().reshape(conv.shape[0], -1)
    assert torch.equal(matrix, fake_quantize(matrix, "mxfp4"))  # on the grid the layer multiplies with
    assert torch.equal(grid_quantize(conv.detach(), QuantSpec.parse("mxfp4")), conv.detach())
    model(torch.randn(2, 1, 8, 8)).sum().backward()  # tiny-cnn images are 8 x 8
    opt.step()
    matrix = conv.detach().reshape(conv.shape[0], -1)
    assert torch.equal(matrix, fake_quantize(matrix, "mxfp4"))  # and stays there after a step
