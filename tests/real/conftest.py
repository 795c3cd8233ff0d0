"""Real-model fixtures shared by the tests in this folder."""

from __future__ import annotations

import pytest
from torch import nn

from mixq.model.load import load_model


@pytest.fixture(scope="session")
def smollm2_cut() -> nn.Module:
    """The first 2 blocks of SmolLM2-135M in fp32, loaded once per session.

    Shared: a test module takes a ``copy.deepcopy`` before it changes anything.
    """
    model = load_model("smollm2")
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    return model
