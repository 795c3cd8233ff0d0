"""Install a resolved plan's runtime pieces on a model: rotations, activation and KV quantizers.

Used twice: by the runner before calibration (``rotate_weights=True``: the online Hadamard is folded
into the weights, ``W <- W M^T``) and when a saved run is loaded back (``rotate_weights=False``: the
saved weights already hold it; only the input rotation and the quantizers are re-created).
"""

from __future__ import annotations

import torch
from torch import nn

from mixq.algorithms.hadamard import block_hadamard, random_signs
from mixq.model import rotate
from mixq.model.arch import arch_facts
from mixq.model.plan_match import ResolvedPlan
from mixq.model.qmodules import ActQuantizer, wrap
from mixq.model.tree import get_module, set_weight_matrix, weight_matrix


def untie_lm_head(model: nn.Module, resolved: ResolvedPlan) -> bool:
    """Give the LM head its own weight when the plan quantizes it and it shares the embedding's.

    The embedding keeps its full-precision table; ``config.tie_word_embeddings`` becomes False so that
    a saved copy reloads untied. Returns True if it untied.
    """
    facts = arch_facts(model)
    if facts.lm_head is None or facts.embeddings is None:
        return False
    row = resolved.by_name().get(facts.lm_head)
    if row is None or row.spec.weights is None:
        return False
    return rotate.untie_lm_head(model, facts)


def hadamard_signs(in_features: int, seed: int | None) -> torch.Tensor | None:
    """The random signs of an online rotation ([in] fp32), or None for a plain Hadamard."""
    return None if seed is None else random_signs(in_features, seed).float()


def install_quantizers(model: nn.Module, resolved: ResolvedPlan, *, rotate_weights: bool) -> None:
    """Wrap every layer that has an online rotation, an input quantizer or a KV-cache quantizer.

    Quantizers start disabled (calibration sees float activations); the caller enables them.
    """
    for row in resolved.layers:
        if row.kind == "attention":
            _install_kv(model, row.name, row.spec.kv)
            continue
        spec = row.spec
        if not row.hadamard and spec.inputs is None:
            continue
        signs = hadamard_signs(row.shape[1], spec.options.hadamard_seed) if row.hadamard else None
        if row.hadamard and rotate_weights:
            module = get_module(model, row.name)
            W = weight_matrix(module)  # [out, in]; y = x W^T = (x M^T)(W M^T)^T
            set_weight_matrix(module, block_hadamard(W, row.hadamard, signs))
        act = ActQuantizer(spec.inputs, spec.static_inputs, row.shape[1]) if spec.inputs is not None else None
        wrap(model, row.name, hadamard=row.hadamard, signs=signs, inputs=act)


def _install_kv(model: nn.Module, attention_name: str, spec) -> None:
    facts = arch_facts(model)
    block_name = attention_name[: -len(facts.require("attention")) - 1]
    for proj in facts.require("kv_projections"):
        wrap(model, f"{block_name}.{proj}", outputs=ActQuantizer(spec))
