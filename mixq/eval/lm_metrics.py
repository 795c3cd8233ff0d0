"""Language-model metrics: perplexity, agreement of next-token distributions, encoder embedding agreement.

Causal LMs are scored one window at a time (``model(input_ids=w[None]).logits``, no BOS added): the
logits at positions ``0..L-2`` predict tokens ``1..L-1``. Log-softmax runs in fp32 per window (a
512 x 49152 block for SmolLM2) and sums accumulate in fp64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Progress = Callable[[int, int], None]


class MetricInputError(ValueError):
    """Inputs to a metric with the wrong shape or contents; the message says what was expected and found."""


@dataclass(frozen=True)
class Perplexity:
    """``ppl = exp(nll)``; ``nll`` is the mean negative log-likelihood (nats) over ``tokens`` predictions."""
    ppl: float
    nll: float
    tokens: int
    seconds: float


@dataclass(frozen=True)
class Agreement:
    """Mean ``KL(p_ref || p_model)`` (nats) and top-1 agreement over ``tokens`` predicted positions."""
    kl: float
    top1: float
    tokens: int


@dataclass(frozen=True)
class EmbeddingAgreement:
    """Mean cosine similarity and relative MSE ``sum ||e - e_ref||^2 / sum ||e_ref||^2`` over ``n`` texts."""
    cosine: float
    rel_mse: float
    n: int


def _check_windows(windows: Tensor) -> Tensor:
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.is_floating_point():
        raise MetricInputError(f"expected integer token windows [n, L] with L >= 2, found "
                               f"{windows.dtype} of shape {tuple(windows.shape)}")
    return windows.long()


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _log_probs(model: nn.Module, window: Tensor) -> Tensor:
    """``[L-1, V]`` fp32 log-probabilities of the next token at positions ``0..L-2`` of one window."""
    logits = model(input_ids=window[None].to(_device(model))).logits[0, :-1]  # [L-1, V]
    return F.log_softmax(logits.float(), dim=-1)


def perplexity(model: nn.Module, windows: Tensor, *, progress: Progress | None = None) -> Perplexity:
    """Perplexity of a causal LM over token windows ``[n, L]`` (LongTensor), each window scored alone.

    Every window contributes the NLL of tokens ``1..L-1``; ``ppl = exp(total_nll / total_tokens)`` with
    ``total_tokens = n * (L - 1)``. ``progress(done, total)`` is called after each window.
    """
    return score(model, windows, progress=progress)[0]


def logit_agreement(model: nn.Module, reference: nn.Module, windows: Tensor, *,
                    progress: Progress | None = None) -> Agreement:
    """Agreement of ``model``'s next-token distributions with ``reference``'s on windows ``[n, L]``.

    Over the ``n * (L - 1)`` predicting positions ``0..L-2`` of every window: the mean of
    ``KL(p_ref || p_model) = sum_v p_ref (log p_ref - log p_model)`` and the fraction of positions
    where both argmax tokens are equal. Both models run on the same window, one window at a time.
    """
    agreement = score(model, windows, reference, progress=progress)[1]
    assert agreement is not None
    return agreement


def score(model: nn.Module, windows: Tensor, reference: nn.Module | None = None, *,
          agreement_windows: int | None = None,
          progress: Progress | None = None) -> tuple[Perplexity, Agreement | None]:
    """Perplexity on all ``windows`` ([n, L]) and, with a ``reference``, agreement on the first
    ``agreement_windows`` of them (all when None), from one forward pass of ``model`` per window."""
    windows = _check_windows(windows)
    k = windows.shape[0] if agreement_windows is None else min(agreement_windows, windows.shape[0])
    start = time.perf_counter()
    nll_sum, kl_sum, agree = 0.0, 0.0, 0
    with torch.inference_mode():
        for i, window in enumerate(windows):
            logq = _log_probs(model, window)  # [L-1, V]
            target = window[1:].to(logq.device)  # [L-1]
            nll_sum -= float(logq.gather(1, target[:, None]).double().sum())
            if reference is not None and i < k:
                logp = _log_probs(reference, window).to(logq.device)  # [L-1, V]
                kl_sum += float((logp.exp() * (logp - logq)).sum(dim=-1).double().sum())
                agree += int((logq.argmax(dim=-1) == logp.argmax(dim=-1)).sum())
            if progress is not None:
                progress(i + 1, len(windows))
    per_window = windows.shape[1] - 1
    tokens = windows.shape[0] * per_window
    nll = nll_sum / tokens
    ppl = Perplexity(ppl=math.exp(nll), nll=nll, tokens=tokens, seconds=time.perf_counter() - start)
    if reference is None or k == 0:
        return ppl, None
    return ppl, Agreement(kl=kl_sum / (k * per_window), top1=agree / (k * per_window), tokens=k * per_window)


def mean_pooled(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``[B, D]`` fp32 sentence embeddings: ``last_hidden_state`` averaged over the attention mask."""
    device = _device(model)
    inputs = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**inputs).last_hidden_state.float()  # [B, T, D]
    mask = inputs["attention_mask"].to(hidden.dtype)[..., None]  # [B, T, 1]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)  # [B, D]


def embedding_agreement(model: nn.Module, reference: nn.Module,
                        batches: Sequence[dict[str, Tensor]]) -> EmbeddingAgreement:
    """Agreement of an encoder's mean-pooled embeddings with a reference encoder's.

    ``batches``: tokenizer outputs (dicts holding ``input_ids`` and ``attention_mask`` ``[B, T]``, e.g.
    from :func:`encoder_batches`). Cosine similarity is averaged over texts; the relative MSE is
    ``sum ||e - e_ref||^2 / sum ||e_ref||^2`` over all texts (fp64 sums).
    """
    if not batches:
        raise MetricInputError("expected at least one batch of tokenizer outputs, found none")
    cos_sum, err, ref_sq, n = 0.0, 0.0, 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            if "attention_mask" not in batch:
                raise MetricInputError(
                    f"expected batches with an 'attention_mask', found keys {sorted(batch)}")
            e = mean_pooled(model, batch).double()  # [B, D]
            e_ref = mean_pooled(reference, batch).double().to(e.device)  # [B, D]
            cos_sum += float(F.cosine_similarity(e, e_ref, dim=-1).sum())
            err += float((e - e_ref).pow(2).sum())
            ref_sq += float(e_ref.pow(2).sum())
            n += e.shape[0]
    return EmbeddingAgreement(cosine=cos_sum / n, rel_mse=err / max(ref_sq, 1e-300), n=n)


def encoder_batches(tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
                    max_length: int = 128) -> list[dict[str, Tensor]]:
    """Tokenizer outputs for ``texts`` in batches of ``batch_size`` (padded, truncated to ``max_length``)."""
    if batch_size < 1:
        raise MetricInputError(f"expected batch_size >= 1, found {batch_size}")
    return [dict(tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]
