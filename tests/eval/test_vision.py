"""Sample images and classifier agreement on tiny random convolutional models."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixq.eval.vision import (IMAGENET_MEAN, IMAGENET_STD, VisionDataError, accuracy, sample_images,
                              sample_photo, top1_agreement)

needs_photos = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None
                                  or importlib.util.find_spec("PIL") is None,
                                  reason="matplotlib's sample photos and Pillow are needed")


def tiny_cnn(seed: int, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, classes)).eval()


@needs_photos
def test_sample_images_are_deterministic_and_normalized():
    x = sample_images(6, size=32, seed=0)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, sample_images(6, size=32, seed=0))
    assert not torch.equal(x, sample_images(6, size=32, seed=1))
    raw = x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5  # undoing the normalization gives [0, 1] pixels
    assert raw.std() > 0.05  # real image content, not a constant
    assert len({tuple(img.flatten()[:50].tolist()) for img in x}) == 6  # all crops differ


@needs_photos
def test_sample_photo_center_crop():
    x = sample_photo("grace_hopper.jpg", size=64)
    assert x.shape == (1, 3, 64, 64)
    with pytest.raises(VisionDataError, match="sample photos"):
        sample_photo("nope.jpg")


def test_top1_agreement_with_itself_and_with_another_model():
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model, other = tiny_cnn(0), tiny_cnn(1)
    same = top1_agreement(model, model, images, batch_size=3)
    assert same.top1 == 1.0 and abs(same.kl) < 1e-7 and same.n == 10
    got = top1_agreement(other, model, images, batch_size=4)
    with torch.no_grad():
        logq, logp = other(images).log_softmax(-1), model(images).log_softmax(-1)
    kl = F.kl_div(logq, logp, log_target=True, reduction="batchmean").item()
    assert got.kl == pytest.approx(kl, rel=1e-4) and got.kl > 0
    assert got.top1 == pytest.approx((logq.argmax(-1) == logp.argmax(-1)).double().mean().item())


def test_accuracy_counts_correct_predictions():
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = tiny_cnn(0)
    with torch.no_grad():
        predicted = model(images).argmax(-1)
    labels = predicted.clone()
    labels[:3] = (labels[:3] + 1) % 10
    assert accuracy(model, images, labels, batch_size=5) == pytest.approx(9 / 12)
    with pytest.raises(VisionDataError, match="labels of shape"):
        accuracy(model, images, labels[:5])
