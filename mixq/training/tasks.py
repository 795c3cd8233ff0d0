"""Small, seeded training tasks for comparing low-precision recipes and optimizers.

A :class:`Task` bundles a model builder, a batch sampler, a loss and an evaluation. Everything random
is seeded: :meth:`Task.build_model` initializes under a private copy of the global RNG seeded with
``seed`` (the caller's RNG state is left alone), batches are drawn with a ``torch.Generator``.

Tasks (:func:`get_task`):

- ``fashion-mnist``: :class:`SmallCNN` (conv 1->32, pool, conv 32->64, pool, fc 3136->128, fc 128->10;
  421 k parameters) on Fashion-MNIST (idx gzip files in :data:`FASHION_DIR`), metric: test accuracy.
  ``conv1`` and ``fc2`` are kept in high precision (their reduction widths 9 and 10 do not fit block
  formats; first/last layers in high precision is the usual practice).
- ``wiki-lm``: a tiny Llama-style causal LM (d=128, 4 layers, 4 heads, MLP 512, tied embeddings,
  about 1.1 M parameters) over **bytes** of the wiki corpus (vocab 256: the text as UTF-8, split 90/10
  like the wiki protocol; a byte vocabulary keeps the LM head small enough for CPU runs), windows of
  128 tokens; metric: held-out loss (nats per byte) on the first ``eval_windows`` test windows.
  ``lm_head`` is kept in high precision. ``vocab="smollm2"`` uses the SmolLM2 tokenizer instead.
- ``tiny-cnn`` / ``tiny-lm``: the same models, tiny, on synthetic data (tests and smoke runs).
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # of the training images scaled to [0, 1]


@dataclass
class Task:
    """A training task. ``make_model()`` builds the model (random init from the global RNG; use
    :meth:`build_model`); ``batch(gen)`` draws a training batch; ``loss(model, batch)`` a scalar;
    ``evaluate(model)`` returns metrics including ``metric``; ``keep``: layer patterns kept in high
    precision by default; ``lr``: default learning rate per optimizer rule (``adam``, ``sgd``)."""

    name: str
    make_model: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Any]
    loss: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    metric: str
    higher_is_better: bool
    keep: tuple[str, ...] = ()
    lr: dict[str, float] = field(default_factory=lambda: {"adam": 1e-3, "sgd": 0.05})
    info: dict[str, Any] = field(default_factory=dict)

    def build_model(self, seed: int) -> nn.Module:
        """The model initialized from ``seed`` (the global RNG state is restored afterwards)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.make_model()
        self.info.setdefault("parameters", sum(p.numel() for p in model.parameters()))
        return model


# --- image classification ------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """conv1 (3x3) -> ReLU -> pool2 -> conv2 (3x3) -> ReLU -> pool2 -> fc1 -> ReLU -> fc2.

    Input ``[N, 1, size, size]`` float (size divisible by 4); output logits ``[N, classes]``.
    """

    def __init__(self, size: int = 28, channels: tuple[int, int] = (32, 64), hidden: int = 128,
                 classes: int = 10) -> None:
        super().__init__()
        if size % 4:
            raise ValueError(f"image size must be divisible by 4, got {size}")
        self.conv1 = nn.Conv2d(1, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.fc1 = nn.Linear(channels[1] * (size // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)                          # [N, c1, s/2, s/2]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)                          # [N, c2, s/4, s/4]
        return self.fc2(F.relu(self.fc1(x.flatten(1))))                     # [N, classes]


def image_task(name: str, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *,
               channels: tuple[int, int] = (32, 64), hidden: int = 128, batch_size: int = 64,
               keep: tuple[str, ...] = ("conv1", "fc2"), eval_batch: int = 1000) -> Task:
    """Classification with :class:`SmallCNN`. ``*_x``: ``[N, 1, S, S]`` float (normalized); ``*_y``:
    ``[N]`` int64 labels. Batches: ``batch_size`` indices drawn with replacement. Metric:
    ``test_accuracy`` (plus ``test_loss``) over the whole test set."""
    size, classes = train_x.shape[-1], int(max(train_y.max(), test_y.max())) + 1

    def batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(train_x), (batch_size,), generator=gen)
        return train_x[idx], train_y[idx]

    def loss(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(b[0]), b[1])

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        correct, total_loss = 0, 0.0
        for i in range(0, len(test_x), eval_batch):
            logits = model(test_x[i:i + eval_batch])
            y = test_y[i:i + eval_batch]
            correct += int((logits.argmax(-1) == y).sum())
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        return {"test_accuracy": correct / len(test_x), "test_loss": total_loss / len(test_x)}

    info = {"train_examples": len(train_x), "test_examples": len(test_x), "batch_size": batch_size}
    return Task(name, lambda: SmallCNN(size, channels, hidden, classes), batch, loss, evaluate,
                "test_accuracy", True, keep, info=info)


def read_idx(path: Path) -> Tensor:
    """The array of an idx file (gzip or plain), as a uint8 tensor of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"expected an idx file of unsigned bytes in {path}, found header {data[:4].hex()}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} ({math.prod(shape)} bytes), found {len(body)} bytes")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(split: str = "train", root: Path | str = FASHION_DIR,
                       limit: int | None = None) -> tuple[Tensor, Tensor]:
    """``(images [N, 28, 28] uint8, labels [N] int64)`` of Fashion-MNIST ``split`` ("train"/"test")."""
    if split not in FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    paths = [root / f for f in FASHION_FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files not found: {', '.join(missing)}; install them with "
                                f"`apt-get install -y dataset-fashion-mnist` (or pass root=)")
    images, labels = read_idx(paths[0]), read_idx(paths[1]).long()
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split")
    return (images[:limit], labels[:limit]) if limit is not None else (images, labels)


def normalize_images(images: Tensor) -> Tensor:
    """uint8 ``[N, S, S]`` -> float ``[N, 1, S, S]`` standardized with the Fashion-MNIST mean/std."""
    return ((images.float() / 255.0 - FASHION_MEAN) / FASHION_STD).unsqueeze(1)


def fashion_mnist(root: Path | str = FASHION_DIR, batch_size: int = 64, eval_size: int | None = None) -> Task:
    """The ``fashion-mnist`` task (60 k training images; test accuracy on ``eval_size`` of the 10 k)."""
    train_x, train_y = load_fashion_mnist("train", root)
    test_x, test_y = load_fashion_mnist("test", root, eval_size)
    task = image_task("fashion-mnist", normalize_images(train_x), train_y, normalize_images(test_x), test_y,
                      batch_size=batch_size)
    task.info["data"] = str(root)
    return task


def tiny_cnn(n_train: int = 256, n_test: int = 128, size: int = 8, classes: int = 4, seed: int = 0,
             batch_size: int = 32) -> Task:
    """Synthetic images: a fixed random template per class plus noise (learnable); a tiny SmallCNN."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 1, size, size, generator=g)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, classes, (n,), generator=g)
        return templates[y] + 0.8 * torch.randn(n, 1, size, size, generator=g), y

    (tx, ty), (vx, vy) = draw(n_train), draw(n_test)
    task = image_task("tiny-cnn", tx, ty, vx, vy, channels=(32, 32), hidden=32, batch_size=batch_size)
    task.lr = {"adam": 1e-2, "sgd": 0.1}
    return task


# --- causal language modelling --------------------------------------------------------------------------

def lm_task(name: str, pool: Tensor, test: Tensor, vocab_size: int, *, d: int = 128, layers: int = 4,
            heads: int = 4, mlp: int | None = None, seq_len: int = 128, batch_size: int = 16,
            eval_windows: int = 16, keep: tuple[str, ...] = ("lm_head",)) -> Task:
    """Causal LM (transformers ``LlamaForCausalLM``, tied embeddings) on windows of a token stream.

    ``pool`` / ``test``: 1-D int64 token streams. Batches: ``batch_size`` windows of ``seq_len`` at
    random starts of ``pool``. Metric: ``heldout_loss`` (mean next-token cross-entropy, nats) over the
    first ``eval_windows`` non-overlapping test windows; also ``heldout_ppl``.
    """
    from transformers import LlamaConfig

    from mixq.eval.corpus import eval_windows as first_windows

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=d, intermediate_size=mlp or 4 * d,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=seq_len, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    held_out = first_windows(test, eval_windows, seq_len)                   # [n, seq_len]
    if len(pool) <= seq_len:
        raise ValueError(f"expected a training stream longer than seq_len={seq_len}, "
                         f"found {len(pool)} tokens")

    def make() -> nn.Module:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(config)

    def batch(gen: torch.Generator) -> Tensor:
        starts = torch.randint(0, len(pool) - seq_len + 1, (batch_size,), generator=gen)
        return pool[starts[:, None] + torch.arange(seq_len)[None, :]]      # [B, seq_len]

    def loss(model: nn.Module, ids: Tensor) -> Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        total = sum(float(loss(model, held_out[i:i + batch_size])) * len(held_out[i:i + batch_size])
                    for i in range(0, len(held_out), batch_size))
        mean = total / len(held_out)
        return {"heldout_loss": mean, "heldout_ppl": math.exp(min(mean, 50.0))}

    info = {"vocab_size": vocab_size, "d": d, "layers": layers, "seq_len": seq_len, "batch_size": batch_size,
            "train_tokens": len(pool), "eval_tokens": eval_windows * seq_len}
    return Task(name, make, batch, loss, evaluate, "heldout_loss", False, keep, info=info)


def wiki_lm(vocab: str = "bytes", seq_len: int = 128, batch_size: int = 16, eval_windows: int = 16) -> Task:
    """The ``wiki-lm`` task: ``vocab="bytes"`` (UTF-8 bytes, 256 ids) or ``"smollm2"`` (its tokenizer)."""
    from mixq.eval.corpus import split_stream, wiki_text

    if vocab == "bytes":
        raw = bytearray(wiki_text().encode("utf-8"))
        pool, test = split_stream(torch.frombuffer(raw, dtype=torch.uint8).long())
        size = 256
    elif vocab == "smollm2":
        from mixq.pipeline import load_tokenizer, token_source

        tokenizer = load_tokenizer("smollm2")
        if tokenizer is None:
            raise ValueError("the SmolLM2 tokenizer could not be loaded; use vocab='bytes'")
        pool, test = token_source("wiki", tokenizer, seq_len)
        size = len(tokenizer)
    else:
        raise ValueError(f"vocab must be 'bytes' or 'smollm2', got {vocab!r}")
    task = lm_task("wiki-lm", pool, test, size, seq_len=seq_len, batch_size=batch_size,
                   eval_windows=eval_windows)
    task.info["vocab"] = vocab
    return task


def tiny_lm(vocab_size: int = 32, tokens: int = 4096, seed: int = 0) -> Task:
    """Synthetic stream from a random sparse bigram chain (learnable); a 2-layer d=32 Llama."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, vocab_size, (vocab_size, 3), generator=g)        # 3 successors per token
    ids = torch.empty(tokens, dtype=torch.long)
    ids[0] = 0
    choice = torch.randint(0, 3, (tokens,), generator=g)
    for t in range(1, tokens):
        ids[t] = nxt[ids[t - 1], choice[t]]
    pool, test = ids[: tokens * 3 // 4], ids[tokens * 3 // 4:]
    task = lm_task("tiny-lm", pool, test, vocab_size, d=32, layers=2, heads=2, seq_len=32, batch_size=4,
                   eval_windows=4)
    task.lr = {"adam": 1e-2, "sgd": 0.1}
    return task


TASKS: dict[str, Callable[..., Task]] = {"fashion-mnist": fashion_mnist, "wiki-lm": wiki_lm,
                                         "tiny-cnn": tiny_cnn, "tiny-lm": tiny_lm}


def get_task(name: str, **kwargs: Any) -> Task:
    """The task called ``name`` (see :data:`TASKS`), built with ``kwargs``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = ["FASHION_DIR", "SmallCNN", "TASKS", "Task", "fashion_mnist", "get_task", "image_task",
           "load_fashion_mnist", "lm_task", "normalize_images", "read_idx", "tiny_cnn", "tiny_lm", "wiki_lm"]
