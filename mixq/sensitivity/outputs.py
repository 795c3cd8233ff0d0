"""What a profile compares and differentiates: model outputs and losses for causal LMs and encoders.

Batches are dicts of ``[B, T]`` tensors: ``input_ids`` and, optionally (required for encoders),
``attention_mask`` (1 = real token), plus whatever else the model takes (``token_type_ids``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixq.sensitivity.table import ProfileError

KINDS = ("lm", "encoder")


class ProfileInputError(ProfileError):
    """Calibration batches or profile options that cannot be used."""


def check_batches(batches: Sequence[dict[str, Tensor]], kind: str) -> None:
    """ProfileInputError unless every batch is a dict with ``input_ids`` (and ``attention_mask`` for encoders)."""
    if kind not in KINDS:
        raise ProfileInputError(f"expected kind 'lm' or 'encoder', found {kind!r}")
    if not batches:
        raise ProfileInputError("expected at least one calibration batch, found none")
    for i, batch in enumerate(batches):
        if not isinstance(batch, dict) or "input_ids" not in batch:
            found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ProfileInputError(f"batch {i}: expected a dict with 'input_ids' [B, T], found {found}")
        if kind == "encoder" and "attention_mask" not in batch:
            raise ProfileInputError(f"batch {i}: an encoder batch needs 'attention_mask', found keys {sorted(batch)}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block; each module's own training flag restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def token_count(batches: Sequence[dict[str, Tensor]]) -> int:
    """Real tokens over all batches (attention mask ones, else every position)."""
    return int(sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                   for b in batches))


def model_forward(model: nn.Module, batch: dict[str, Tensor], kind: str) -> Tensor:
    """LM: logits ``[B, T, V]`` (model dtype); encoder: ``last_hidden_state`` ``[B, T, D]``."""
    if kind == "lm":
        return model(**batch, use_cache=False).logits
    return model(**batch).last_hidden_state


def pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    """``[B, D]`` fp32 mean of ``hidden`` ``[B, T, D]`` over the positions where ``mask`` ``[B, T]`` is 1."""
    m = mask.to(torch.float32)[..., None]  # [B, T, 1]
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)  # [B, D]


def lm_loss(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy (fp32) of ``logits`` ``[B, T, V]`` on ``batch['input_ids']``."""
    ids = batch["input_ids"]
    target = ids[:, 1:]  # [B, T-1]
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
    nll = -logp.gather(-1, target[..., None])[..., 0]  # [B, T-1]
    if "attention_mask" in batch:
        keep = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).to(nll.dtype)
        return (nll * keep).sum() / keep.sum().clamp_min(1.0)
    return nll.mean()


def reference_of(kind: str, out: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """What the measured metric compares: LM log-probs ``[B, T, V]`` fp32; encoder pooled ``[B, D]`` fp32."""
    if kind == "lm":
        return F.log_softmax(out.float(), dim=-1)
    return pooled(out, batch["attention_mask"])


def divergence(kind: str, ref: Tensor, out: Tensor, batch: dict[str, Tensor]) -> tuple[float, int]:
    """(sum, count) of the per-token KL(p_ref || p) (LM) or the per-text 1 - cosine (encoder).

    ``ref`` from :func:`reference_of`; ``out`` the raw output (logits or last hidden state). Sums in fp64.
    """
    if kind == "encoder":
        e = pooled(out, batch["attention_mask"]).double()  # [B, D]
        cos = F.cosine_similarity(e, ref.double(), dim=-1)  # [B]
        return float((1.0 - cos).sum()), int(e.shape[0])
    logq = F.log_softmax(out.float(), dim=-1)  # [B, T, V]
    kl = (ref.exp() * (ref - logq)).sum(-1).double()  # [B, T]
    if "attention_mask" in batch:
        m = batch["attention_mask"].to(torch.float64)
        return float((kl * m).sum()), int(m.sum())
    return float(kl.sum()), int(kl.numel())
