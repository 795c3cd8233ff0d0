"""Greedy generation with the Hugging Face KV cache, for packed or fake-quant causal LMs."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


@torch.no_grad()
def greedy_tokens(model: nn.Module, input_ids: Tensor, max_new_tokens: int = 32,
                  eos_token_id: int | None = None) -> Tensor:
    """Greedy continuation of ``input_ids`` (int64 ``[1, T]``): the new token ids, int64 ``[1, n]``.

    One forward pass over the prompt (prefill), then one token at a time reusing the model's KV
    cache (``past_key_values``). Stops after ``max_new_tokens`` or at ``eos_token_id``.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_tokens takes one sequence [1, T], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    # transformers >= 5.2x names the cache argument ``cache`` (``past_key_values`` is deprecated)
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # only the last position's logits
    new: list[Tensor] = []
    past = None
    ids = input_ids
    attention = torch.ones_like(input_ids)
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=attention, use_cache=True, **{key: past}, **last)
        past = getattr(out, key)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # [1, 1]
        new.append(token)
        if eos_token_id is not None and int(token) == eos_token_id:
            break
        ids = token
        attention = torch.cat([attention, torch.ones_like(token)], dim=1)
    return torch.cat(new, dim=1) if new else input_ids.new_zeros(1, 0)


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """The greedy continuation of ``prompt`` (text, without the prompt), stopping at the EOS token."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # [1, T]
    new = greedy_tokens(model, ids, max_new_tokens, tokenizer.eos_token_id)
    return tokenizer.decode(new[0], skip_special_tokens=True)
