"""Which weights the study sees, in which layout."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mixq.model import count_parameters, linear_weights


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, groups=1)
        self.depthwise = nn.Conv2d(8, 8, kernel_size=3, groups=8)
        self.gpt2 = Conv1D(24, 16)  # weight stored [in=16, out=24]
        self.fc = nn.Linear(16, 32)
        self.fc_shared = nn.Linear(16, 32)
        self.fc_shared.weight = self.fc.weight  # the same tensor twice
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied to the embedding
        self.norm = nn.LayerNorm(16)  # has a weight, but is not linear-like


def test_layouts_and_selection():
    m = Toy()
    got = dict(linear_weights(m))
    assert list(got) == ["conv", "depthwise", "gpt2", "fc"]
    assert got["conv"].shape == (8, 27) and torch.equal(got["conv"], m.conv.weight.reshape(8, 27))
    assert got["depthwise"].shape == (8, 9)
    assert got["gpt2"].shape == (24, 16) and torch.equal(got["gpt2"], m.gpt2.weight.t())
    assert got["fc"].shape == (32, 16) and not got["fc"].requires_grad
    assert got["fc"].data_ptr() == m.fc.weight.data_ptr()  # a view, not a copy
    assert count_parameters(list(got.items())) == 8 * 27 + 8 * 9 + 24 * 16 + 32 * 16


def test_embeddings_on_request_and_tied_head_counted_once():
    names = [n for n, _ in linear_weights(Toy(), include_embeddings=True)]
    assert names == ["embed", "conv", "depthwise", "gpt2", "fc"]  # head is the embedding's tensor
