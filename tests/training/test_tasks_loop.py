"""Training tasks, the emulated-model swap and the training loop, on tiny synthetic tasks."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch
from torch import nn

from mixq.model.emulate_swap import emulate, emulated_layers, restore
from mixq.training.emulated import EmulatedLinear, GemmFormats
from mixq.training.emulated_conv import EmulatedConv2d
from mixq.training.loop import OPTIMIZERS, train
from mixq.training.tasks import FASHION_DIR, get_task, load_fashion_mnist


@pytest.fixture(scope="module")
def cnn():
    return get_task("tiny-cnn")


@pytest.fixture(scope="module")
def lm():
    return get_task("tiny-lm")


def test_emulated_conv_fp32_matches_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    em = EmulatedConv2d(conv, GemmFormats())
    y, y_ref = em(x), conv(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, em.weight), g)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, conv.weight), g)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_emulate_swaps_per_overrides_and_restores():
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 16, 32),
                          nn.Linear(32, 3))
    x = torch.randn(2, 1, 4, 4)
    ref = model(x)
    assert emulate(model, "fp32") == {}  # nothing to emulate: the model is untouched
    chosen = emulate(model, "fp8", [("3", None)], seed=5)
    assert set(chosen) == {"0", "2"} and chosen["2"].seed == 6  # layer index 1 among linear/conv layers
    assert isinstance(model[0], EmulatedConv2d) and isinstance(model[2], EmulatedLinear)
    assert isinstance(model[3], nn.Linear)
    assert not torch.equal(model(x), ref)
    assert set(restore(model)) == {"0", "2"} and not emulated_layers(model)
    torch.testing.assert_close(model(x), ref)


def test_emulate_rejects_blocks_that_do_not_fit():
    with pytest.raises(ValueError, match="layer 0 .*keep the layer"):
        emulate(nn.Sequential(nn.Linear(24, 8)), "mxfp8")


def _plain_adam(task, steps, seed, lr):
    model = task.build_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        loss = task.loss(model, task.batch(gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, model


def test_fp32_adam_equals_plain_torch_training(cnn):
    result = train(cnn, "fp32", "adam", 6, seed=3)
    losses, model = _plain_adam(cnn, 6, 3, cnn.lr["adam"])
    assert result.losses == losses
    assert result.metrics == cnn.evaluate(model.eval())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("recipe", ["fp32", "fp8"])
def test_every_optimizer_and_recipe_runs(cnn, recipe, optimizer):
    wf = "fp8_e4m3" if recipe == "fp32" else None  # grid optimizers need a grid; fp8 gives its own
    r = train(cnn, recipe, optimizer, 3, seed=0, weight_format=wf)
    assert len(r.losses) == 3 and all(torch.isfinite(torch.tensor(r.losses)))
    assert 0 <= r.final <= 1
    assert bool(r.emulated_layers) == (recipe == "fp8")
    if optimizer in ("eco", "sr", "naive", "master"):
        assert r.weight_format == "fp8_e4m3"


def test_repeatable_with_the_same_seed(cnn, lm):
    a, b = train(cnn, "nvfp4", "sr", 3, seed=1), train(cnn, "nvfp4", "sr", 3, seed=1)
    assert a.losses == b.losses and a.metrics == b.metrics
    c = train(cnn, "nvfp4", "sr", 3, seed=2)
    assert c.losses != a.losses
    x, y = train(lm, "fp8", "eco", 2, seed=0), train(lm, "fp8", "eco", 2, seed=0)
    assert x.losses == y.losses and x.metrics == y.metrics
    assert "lm_head" not in x.emulated_layers and x.emulated_layers  # kept by the task's default


def test_lm_recipes_train(lm):
    base = train(lm, "fp32", "adam", 8, seed=0)
    assert base.losses[-1] < base.losses[0]
    r = train(lm, "nvfp4", "adam", 4, seed=0)
    assert r.metric == "heldout_loss" and r.final > 0


def test_grid_optimizer_without_a_grid_is_an_error(cnn):
    with pytest.raises(ValueError, match="weight format"):
        train(cnn, "fp32", "eco", 1)


def test_qat_mode_with_ptq_baseline(cnn):
    r = train(cnn, "fp32", "adam", 4, seed=0, qat="int4:g8")
    assert r.qat == "int4:g8" and set(r.ptq) == {"fp32", "ptq"}
    assert 0 <= r.ptq["ptq"]["test_accuracy"] <= 1
    with pytest.raises(ValueError, match="QAT"):
        train(cnn, "fp8", "adam", 1, qat="int4:g8")


@pytest.mark.parametrize("scaling", ["delayed", "predicted"])
def test_delayed_and_predicted_scaling_in_training(lm, scaling):
    r = train(lm, "fp8", "adam", 3, seed=0, scaling=scaling)
    current = train(lm, "fp8", "adam", 3, seed=0)
    assert r.scaling == scaling and all(torch.isfinite(torch.tensor(r.losses)))
    assert r.losses[0] == current.losses[0]  # the first step scales every tensor by its own amax
    assert r.losses[1:] != current.losses[1:]  # later steps use the history / the predicted weight amax
    with pytest.raises(ValueError, match="scaling"):
        train(lm, "fp8", "adam", 1, scaling="moss")


def test_qat_fine_tuning_starts_from_the_fp32_trained_model(cnn):
    fp32 = train(cnn, "fp32", "adam", 6, seed=0)
    tuned = train(cnn, "fp32", "adam", 3, seed=0, qat="int4:tensor", qat_init="fp32", pretrain_steps=6)
    scratch = train(cnn, "fp32", "adam", 3, seed=0, qat="int4:tensor", ptq_baseline=False)
    assert tuned.qat_init == "fp32" and tuned.pretrain_steps == 6
    assert tuned.ptq["fp32"] == fp32.metrics  # the same seeded fp32 run, not a second different one
    assert set(tuned.ptq) == {"fp32", "ptq", "fp32_continued"}
    assert tuned.losses[0] < scratch.losses[0]  # its first QAT step already sees trained weights
    with pytest.raises(ValueError, match="qat_init"):
        train(cnn, "fp32", "adam", 1, qat="int4:tensor", qat_init="pretrained")
    with pytest.raises(ValueError, match="qat spec"):
        train(cnn, "fp32", "adam", 1, qat_init="fp32")


def _cli(argv):
    from mixq import cli, cli_train

    common = argparse.ArgumentParser(add_help=False)
    parser = argparse.ArgumentParser(prog="mixq")
    cli_train.add_parsers(parser.add_subparsers(dest="command"), common)
    args = parser.parse_args(["train", *argv])
    return cli_train.cmd_train(args, cli._consoles, cli._quiet_transformers)


def test_cli_writes_summary_curve_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(["--task", "tiny-cnn", "--recipe", "fp8", "--optimizer", "eco", "--steps", "4",
                 "--eval-every", "2", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert printed["metrics"] == summary["metrics"] and len(summary["losses"]) == 4
    rows = list(csv.DictReader(open(out / "curve.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and rows[1]["test_accuracy"] != ""
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="exists"):
        _cli(["--task", "tiny-cnn", "--steps", "1", "--out", str(out)])
    assert _cli(["--task", "tiny-cnn", "--steps", "1", "--out", str(out), "--overwrite"]) == 0


@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)")
def test_fashion_mnist_loader_first_images():
    images, labels = load_fashion_mnist("test", limit=64)
    assert images.shape == (64, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (64,) and int(labels.min()) >= 0 and int(labels.max()) <= 9
    assert labels[:4].tolist() == [9, 2, 1, 1]  # ankle boot, pullover, trouser, trouser


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_unknown_task_and_recipe(cnn):
    with pytest.raises(ValueError, match="tasks: fashion-mnist"):
        get_task("mnist")
    with pytest.raises(KeyError, match="Recipes"):
        train(cnn, "fp9", "adam", 1)
