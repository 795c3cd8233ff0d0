"""Image classifiers without labelled data: sample photos, agreement with a reference model, accuracy.

No labelled ImageNet data is available offline, so a quantized classifier is judged by its top-1
agreement and KL divergence against the fp32 model on unlabelled images. The images are random
resized crops and flips (seeded ``torch.Generator``) of the photos that ship with matplotlib
(``mpl-data/sample_data``), decoded with Pillow; matplotlib is located with
:func:`importlib.util.find_spec` and not imported.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Photos of real objects in matplotlib's sample data (logo2.png, a rendered logo, is left out).
PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
CROP_SCALE = (0.25, 1.0)  # fraction of the photo's area kept by a random resized crop
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio range of the crop (as torchvision's RandomResizedCrop)


class VisionDataError(ValueError):
    """Missing sample photos or bad classifier inputs; the message says what was expected and found."""


@dataclass(frozen=True)
class ClassifierAgreement:
    """Top-1 agreement with the reference and mean ``KL(p_ref || p_model)`` (nats) over ``n`` images."""
    top1: float
    kl: float
    n: int


def sample_photo_paths() -> list[Path]:
    """Paths of the photos in matplotlib's ``mpl-data/sample_data`` (see :data:`PHOTOS`) that exist."""
    try:
        spec = importlib.util.find_spec("matplotlib")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise VisionDataError("expected matplotlib to be installed for its sample photos, found no such "
                              "package (pip install matplotlib, or mixq[plot])")
    folder = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "sample_data"
    paths = [folder / name for name in PHOTOS if (folder / name).is_file()]
    if not paths:
        raise VisionDataError(f"expected the sample photos {', '.join(PHOTOS)} in {folder}, found none")
    return paths


def read_photo(path: Path) -> Tensor:
    """``[3, H, W]`` fp32 RGB in ``[0, 1]``; transparency is composited onto white."""
    try:
        from PIL import Image
    except ImportError as err:
        raise VisionDataError("expected Pillow to decode the sample photos, found it missing "
                              "(pip install pillow)") from err
    with Image.open(path) as img:
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        rgb = img.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        width, height = rgb.size
    return data.reshape(height, width, 3).permute(2, 0, 1).float() / 255.0  # [3, H, W]


def normalize(images: Tensor) -> Tensor:
    """ImageNet mean/std normalization of ``[..., 3, H, W]`` images in ``[0, 1]``."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype)[:, None, None]
    return (images - mean) / std


def _resize(image: Tensor, height: int, width: int) -> Tensor:
    """Antialiased bilinear resize of ``[3, h, w]`` to ``[3, height, width]``."""
    return F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def _crop_box(height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, following torchvision's sampling (10 tries, else all)."""
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[0])
        ratio = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def sample_images(n: int = 64, size: int = 224, seed: int = 0) -> Tensor:
    """``[n, 3, size, size]`` fp32 ImageNet-normalized images, deterministic in ``seed``.

    Image ``i`` is a random resized crop (area fraction in :data:`CROP_SCALE`, aspect ratio in
    :data:`CROP_RATIO`) of a randomly chosen sample photo, flipped left-right with probability 1/2.
    """
    if n < 1 or size < 1:
        raise VisionDataError(f"expected n >= 1 and size >= 1, found n={n}, size={size}")
    photos = [read_photo(p) for p in sample_photo_paths()]
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        photo = photos[int(torch.randint(0, len(photos), (1,), generator=gen))]
        top, left, h, w = _crop_box(photo.shape[1], photo.shape[2], gen)
        image = _resize(photo[:, top:top + h, left:left + w], size, size)  # [3, size, size]
        if float(torch.rand(1, generator=gen)) < 0.5:
            image = image.flip(-1)
        out[i] = image.clamp(0.0, 1.0)
    return normalize(out)


def sample_photo(name: str = "grace_hopper.jpg", size: int = 224) -> Tensor:
    """``[1, 3, size, size]`` standard eval preprocessing of one sample photo: shorter side resized to
    ``round(size * 256 / 224)``, center crop of ``size``, ImageNet normalization."""
    paths = {p.name: p for p in sample_photo_paths()}
    if name not in paths:
        raise VisionDataError(f"expected one of the sample photos {sorted(paths)}, found {name!r}")
    photo = read_photo(paths[name])
    height, width = photo.shape[1:]
    short = round(size * 256 / 224)
    scale = short / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    image = _resize(photo, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return normalize(image[:, top:top + size, left:left + size].clamp(0.0, 1.0))[None]


def _logits(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """``[n, C]`` fp32 logits, computed in batches under inference mode."""
    if images.dim() != 4 or batch_size < 1:
        raise VisionDataError(f"expected images [n, C, H, W] and batch_size >= 1, found shape "
                              f"{tuple(images.shape)}, batch_size={batch_size}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.inference_mode():
        return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])


def top1_agreement(model: nn.Module, reference: nn.Module, images: Tensor,
                   batch_size: int = 16) -> ClassifierAgreement:
    """Fraction of ``images`` ``[n, 3, H, W]`` where both argmax classes match, and the mean
    ``KL(p_ref || p_model)`` of the softmax outputs (fp32 log-softmax, fp64 sums)."""
    logq = F.log_softmax(_logits(model, images, batch_size), dim=-1)  # [n, C]
    logp = F.log_softmax(_logits(reference, images, batch_size), dim=-1)  # [n, C]
    kl = (logp.exp() * (logp - logq)).sum(dim=-1).double().mean()
    top1 = (logq.argmax(-1) == logp.argmax(-1)).double().mean()
    return ClassifierAgreement(top1=float(top1), kl=float(kl), n=len(images))


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 16) -> float:
    """Top-1 accuracy of ``model`` on ``images`` ``[n, C, H, W]`` with integer ``labels`` ``[n]``."""
    if labels.shape != (len(images),):
        raise VisionDataError(f"expected labels of shape ({len(images)},), found {tuple(labels.shape)}")
    predicted = _logits(model, images, batch_size).argmax(-1)
    return float((predicted == labels.cpu()).double().mean())
