"""Offline rotation of the residual stream folded into the weights (QuaRot / SpinQuant style).

For a pre-norm RMSNorm transformer the residual stream ``h`` (row vectors ``[..., d]``) can be
replaced by ``h Q`` for any orthogonal ``Q [d, d]`` without changing the model's output:

1. :func:`fuse_norms` folds every RMSNorm gain ``g`` into the input columns of the linears it feeds
   (``W[:, j] *= g_j``; Gemma's ``x * (1 + w)`` folds ``1 + w``) and resets the norm to identity
   (weight 1, Gemma weight 0). RMSNorm without a gain is rotation invariant: ``rms(h Q) = rms(h)``.
2. :func:`rotate_model` then sets embeddings ``E <- E Q``, residual readers (q, k, v, gate, up and
   the LM head) ``W <- W Q`` and residual writers (o, down) ``W <- Q^T W``, ``b <- Q^T b``.

Gemma multiplies embeddings by ``sqrt(d)``, a scalar, which commutes with ``Q``. LayerNorm families
(OPT, GPT-2, BERT) subtract the mean, which does not commute with a general rotation, and are refused.
A tied LM head is untied first (the final norm's gain is folded into the head, not the embeddings).
Math is done in fp64 and written back in each parameter's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixq.algorithms.hadamard import rotation_matrix
from mixq.model.arch import ArchFacts, ArchitectureError, arch_facts
from mixq.model.tree import blocks, get_module

RMS_KINDS = ("rms", "rms_plus_one")


@dataclass(frozen=True)
class RotationReport:
    """What :func:`rotate` did: rotation size and kind, whether the LM head was untied, norms fused."""

    hidden: int
    kind: str
    seed: int | None
    untied: bool
    norms_fused: int


def _check_rotatable(facts: ArchFacts) -> None:
    """Raise ArchitectureError unless the facts describe an RMSNorm model with every needed path."""
    norm_kind = facts.require("norm_kind", needed_by="offline rotation")
    if norm_kind not in RMS_KINDS:
        raise ArchitectureError(f"offline rotation needs RMSNorm; family {facts.family!r} uses LayerNorm "
                                f"(norm_kind={norm_kind!r}, expected one of {RMS_KINDS})")
    for fact in ("blocks", "embeddings", "final_norm", "lm_head", "scale_groups", "residual_readers",
                 "residual_writers"):
        facts.require(fact, needed_by="offline rotation")


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = get_module(model, name)
    if not isinstance(module, nn.Linear):
        raise ArchitectureError(f"offline rotation expects {name!r} to be nn.Linear, "
                                f"found {type(module).__name__}")
    return module


def _norm_weight(module: nn.Module, name: str) -> nn.Parameter:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or getattr(module, "bias", None) is not None:
        raise ArchitectureError(f"offline rotation expects {name!r} to be an RMSNorm with a 1-D weight and "
                                f"no bias, found {type(module).__name__}")
    return weight


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return ("norm" in type(module).__name__.lower() and isinstance(weight, Tensor) and weight.dim() == 1)


def _hidden(model: nn.Module, facts: ArchFacts) -> int:
    return int(get_module(model, facts.require("embeddings")).weight.shape[1])


def _norm_groups(model: nn.Module, facts: ArchFacts) -> list[tuple[str, nn.Parameter, list[nn.Linear]]]:
    """``[(norm name, norm weight [d], linears it feeds)]`` for every block norm and the final norm.

    Raises ArchitectureError when a block holds a hidden-size norm that feeds no recorded linears
    (a "sandwich" norm on a sublayer output, as in Gemma 2/3): it cannot be folded into weights.
    """
    hidden = _hidden(model, facts)
    groups = []
    for block_name, block in blocks(model, facts):
        fused = set()
        for group in facts.scale_groups:
            prev = get_module(block, group.prev)
            if isinstance(prev, nn.Linear):
                continue
            name = f"{block_name}.{group.prev}"
            groups.append((name, _norm_weight(prev, name), [_linear(block, lin) for lin in group.linears]))
            fused.add(group.prev)
        for name, module in block.named_modules():
            if _is_norm(module) and module.weight.numel() == hidden and name not in fused:
                raise ArchitectureError(
                    f"offline rotation needs every residual-size norm to feed residual readers; family "
                    f"{facts.family!r} has {block_name}.{name}, which feeds none "
                    f"(a norm on a sublayer output)")
    final = facts.require("final_norm")
    head = _linear(model, facts.require("lm_head"))
    groups.append((final, _norm_weight(get_module(model, final), final), [head]))
    return groups


def _write(param: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def lm_head_tied(model: nn.Module, facts: ArchFacts) -> bool:
    """Whether the LM head's weight shares storage with the input embeddings."""
    head = get_module(model, facts.require("lm_head")).weight
    emb = get_module(model, facts.require("embeddings")).weight
    return head is emb or (head.device == emb.device and head.data_ptr() == emb.data_ptr())


def untie_lm_head(model: nn.Module, facts: ArchFacts) -> bool:
    """Give a tied LM head its own Parameter (a clone) and set ``config.tie_word_embeddings = False``.

    Returns True when it untied, False when the head already had its own weight.
    """
    if not lm_head_tied(model, facts):
        return False
    head = get_module(model, facts.require("lm_head"))
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
        text = getattr(config, "get_text_config", None)
        if callable(text):
            text().tie_word_embeddings = False
    return True


def fuse_norms(model: nn.Module, facts: ArchFacts) -> None:
    """Fold every RMSNorm gain into the linears it feeds and reset the norm to identity, in place.

    ``W[:, j] *= g_j`` with ``g = w`` ("rms") or ``g = 1 + w`` ("rms_plus_one"); the norm weight
    becomes ones (zeros for "rms_plus_one"). A tied LM head is untied first. The float output is
    unchanged (up to rounding).
    """
    _check_rotatable(facts)
    _norm_groups(model, facts)  # validate before changing anything
    untie_lm_head(model, facts)
    groups = _norm_groups(model, facts)  # after untying: the head may hold a new Parameter
    plus_one = facts.norm_kind == "rms_plus_one"
    for _, weight, linears in groups:
        w = weight.detach().double()                                   # [d]
        g = 1.0 + w if plus_one else w
        for lin in linears:
            _write(lin.weight, lin.weight.detach().double() * g.to(lin.weight.device)[None, :])  # [out, d]
        _write(weight, torch.zeros_like(w) if plus_one else torch.ones_like(w))


def _check_fused(groups: list[tuple[str, nn.Parameter, list[nn.Linear]]], norm_kind: str) -> None:
    identity = 0.0 if norm_kind == "rms_plus_one" else 1.0
    for name, weight, _ in groups:
        if not bool((weight.detach() == identity).all()):
            raise ValueError(f"rotate_model expects fused norms (weight all {identity}), found {name} "
                             f"with weights in [{weight.min().item():.3g}, {weight.max().item():.3g}]: "
                             f"call fuse_norms first")


def rotate_model(model: nn.Module, Q: Tensor, facts: ArchFacts) -> None:
    """Rotate the residual stream by orthogonal ``Q [d, d]`` (fp64), in place; norms must be fused.

    ``E <- E Q``; readers and LM head ``W <- W Q``; writers ``W <- Q^T W``, ``b <- Q^T b``.
    Unties a tied LM head first (it would otherwise be rotated twice).
    """
    _check_rotatable(facts)
    hidden = _hidden(model, facts)
    if tuple(Q.shape) != (hidden, hidden):
        raise ValueError(f"rotation must be [{hidden}, {hidden}] (the hidden size), found {list(Q.shape)}")
    _check_fused(_norm_groups(model, facts), facts.norm_kind)
    untie_lm_head(model, facts)
    Q = Q.detach().double()

    def right(param: Tensor) -> None:                                  # W <- W Q, W [*, d]
        _write(param, param.detach().double() @ Q.to(param.device))

    right(get_module(model, facts.embeddings).weight)                  # [vocab, d]
    for _, block in blocks(model, facts):
        for name in facts.residual_readers:
            right(_linear(block, name).weight)                         # [out, d]
        for name in facts.residual_writers:
            lin = _linear(block, name)
            Qd = Q.to(lin.weight.device)
            _write(lin.weight, Qd.T @ lin.weight.detach().double())    # [d, in]
            if lin.bias is not None:
                _write(lin.bias, Qd.T @ lin.bias.detach().double())    # [d]
    right(_linear(model, facts.lm_head).weight)                        # [vocab, d]


def rotate(model: nn.Module, *, kind: str = "hadamard", seed: int | None = None) -> RotationReport:
    """Fuse norms and rotate the residual stream of an RMSNorm model in place; the float output is unchanged.

    kind: "hadamard" (orthonormal Hadamard of the hidden size, times random signs when `seed` is given)
    or "random" (Haar-random orthogonal, `seed` 0 when None). Raises ArchitectureError for LayerNorm
    families and for families missing a needed fact, HadamardError when no Hadamard of the hidden size
    is constructible; the model is untouched when it raises.
    """
    facts = arch_facts(model)
    _check_rotatable(facts)
    hidden = _hidden(model, facts)
    Q = rotation_matrix(hidden, kind=kind, seed=seed)                  # [d, d] fp64
    n_norms = len(_norm_groups(model, facts))
    untied = untie_lm_head(model, facts)
    fuse_norms(model, facts)
    rotate_model(model, Q, facts)
    used_seed = 0 if kind == "random" and seed is None else seed
    return RotationReport(hidden=hidden, kind=kind, seed=used_seed, untied=untied, norms_fused=n_norms)
