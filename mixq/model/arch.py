"""Per-architecture facts as data: where the blocks are, which norm feeds which linears.

One table (:func:`facts_table`) maps a ``config.model_type`` to an :class:`ArchFacts` whose module
paths are relative to the *base model* (``LlamaModel``, ``GPT2Model``, ``BertModel``) for the
trunk (``blocks``, ``embeddings``, ``final_norm``) and relative to the loaded model for the head
(``lm_head``). :func:`arch_facts` finds where the base model sits inside whatever was loaded
(``LlamaForCausalLM`` -> ``model.``, ``BertForMaskedLM`` -> ``bert.``, ``BertModel`` -> no prefix)
and returns facts with full dotted paths. Names inside a block (scale groups, readers, writers,
kv projections, attention) stay relative to the block.

An unknown ``model_type`` gets only ``blocks`` (the ModuleList with most parameters whose
children all share one class); every other fact is None/empty and :meth:`ArchFacts.require`
raises :class:`ArchitectureError` when an algorithm asks for it.

Scale groups (AWQ / SmoothQuant): ``prev`` feeds exactly ``linears`` through a map that commutes
with a positive per-channel scale, so dividing ``prev``'s output channels by ``s`` and multiplying
the linears' input columns by ``s`` leaves the model unchanged. A group ``v_proj -> o_proj`` is
recorded even under grouped-query attention, where ``v_proj.out != o_proj.in``; the runner must
check that the sizes agree before using it (AutoAWQ does the same).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from torch import nn


class ArchitectureError(ValueError):
    """A fact about a model's architecture is missing or a module path does not resolve."""


@dataclass(frozen=True)
class ScaleGroup:
    """``prev`` (a norm or a linear, name relative to a block) feeds exactly ``linears``."""

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchFacts:
    """Where things are in one model family. Empty string / None / () means "not known"."""

    family: str
    blocks: str
    embeddings: str | None = None
    final_norm: str | None = None
    lm_head: str | None = None
    norm_kind: str | None = None
    scale_groups: tuple[ScaleGroup, ...] = ()
    residual_readers: tuple[str, ...] = ()
    residual_writers: tuple[str, ...] = ()
    kv_projections: tuple[str, str] | None = None
    attention: str | None = None

    def require(self, fact: str, needed_by: str | None = None) -> Any:
        """The value of ``fact``; ArchitectureError naming the family and the fact when it is missing."""
        names = [f.name for f in fields(self)]
        if fact not in names:
            raise ArchitectureError(f"ArchFacts has no field {fact!r}; expected one of {names}")
        value = getattr(self, fact)
        if value is None or (isinstance(value, (str, tuple)) and len(value) == 0):
            why = f" (needed by {needed_by})" if needed_by else ""
            raise ArchitectureError(f"family {self.family!r} has no fact {fact!r}{why}; "
                                    f"known families: {', '.join(known_families())}")
        return value


NORM_KINDS = ("rms", "rms_plus_one", "layer")


def _llama_like(family: str, norm_kind: str = "rms", mlp_norm: str = "post_attention_layernorm") -> ArchFacts:
    # The MLP is down(act(gate(x)) * up(x)): linear in up's output, so up -> down is a valid group.
    return ArchFacts(
        family=family, blocks="layers", embeddings="embed_tokens", final_norm="norm", lm_head="lm_head",
        norm_kind=norm_kind,
        scale_groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj")),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),  # only when v.out == o.in (no GQA)
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
        ),
        residual_readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                          "mlp.up_proj"),
        residual_writers=("self_attn.o_proj", "mlp.down_proj"),
        kv_projections=("self_attn.k_proj", "self_attn.v_proj"), attention="self_attn",
    )


def _phi3() -> ArchFacts:
    # Fused qkv_proj and gate_up_proj: v -> o and up -> down cannot be scaled separately.
    return ArchFacts(
        family="phi3", blocks="layers", embeddings="embed_tokens", final_norm="norm", lm_head="lm_head",
        norm_kind="rms",
        scale_groups=(ScaleGroup("input_layernorm", ("self_attn.qkv_proj",)),
                      ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",))),
        residual_readers=("self_attn.qkv_proj", "mlp.gate_up_proj"),
        residual_writers=("self_attn.o_proj", "mlp.down_proj"), kv_projections=None, attention="self_attn",
    )


def _opt(pre_norm: bool) -> ArchFacts:
    # fc1 -> ReLU -> fc2: ReLU is positively homogeneous (relu(x/s) = relu(x)/s for s > 0), so
    # scaling fc1's rows by 1/s and fc2's columns by s is exact for positive s.
    value_groups = (ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",)), ScaleGroup("fc1", ("fc2",)))
    # Post-LN OPT (opt-350m) normalizes after the residual add: its norms feed the residual stream
    # too, so they cannot absorb a scale.
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    norm_groups = (ScaleGroup("self_attn_layer_norm", qkv),
                   ScaleGroup("final_layer_norm", ("fc1",))) if pre_norm else ()
    return ArchFacts(
        family="opt", blocks="decoder.layers", embeddings="decoder.embed_tokens",
        final_norm="decoder.final_layer_norm" if pre_norm else None, lm_head="lm_head", norm_kind="layer",
        scale_groups=norm_groups + value_groups,
        residual_readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1"),
        residual_writers=("self_attn.out_proj", "fc2"),
        kv_projections=("self_attn.k_proj", "self_attn.v_proj"), attention="self_attn",
    )


def _gpt2() -> ArchFacts:
    # c_attn is a fused qkv Conv1D, so v alone cannot absorb a scale; c_fc -> GELU -> c_proj is not
    # scale-equivariant. Only the two LayerNorms make groups.
    return ArchFacts(
        family="gpt2", blocks="h", embeddings="wte", final_norm="ln_f", lm_head="lm_head", norm_kind="layer",
        scale_groups=(ScaleGroup("ln_1", ("attn.c_attn",)), ScaleGroup("ln_2", ("mlp.c_fc",))),
        residual_readers=("attn.c_attn", "mlp.c_fc"), residual_writers=("attn.c_proj", "mlp.c_proj"),
        kv_projections=None, attention="attn",
    )


def _bert(family: str, lm_head: str) -> ArchFacts:
    # BERT is post-LN: every LayerNorm output is both the next linears' input and the residual, so
    # no norm can absorb a scale. value -> attention.output.dense is linear (softmax mixes tokens,
    # not channels; no GQA), so it is the one valid group. intermediate.dense -> GELU -> output.dense
    # is not scale-equivariant.
    return ArchFacts(
        family=family, blocks="encoder.layer", embeddings="embeddings.word_embeddings", final_norm=None,
        lm_head=lm_head, norm_kind="layer",
        scale_groups=(ScaleGroup("attention.self.value", ("attention.output.dense",)),),
        residual_readers=("attention.self.query", "attention.self.key", "attention.self.value",
                          "intermediate.dense"),
        residual_writers=("attention.output.dense", "output.dense"),
        kv_projections=("attention.self.key", "attention.self.value"), attention="attention.self",
    )


def facts_table() -> dict[str, ArchFacts]:
    """``model_type`` -> facts with base-model-relative trunk paths (a fresh dict on each call)."""
    # Gemma 2/3 apply post_attention_layernorm to the attention output before the residual add;
    # their MLP input norm is pre_feedforward_layernorm.
    return {
        "llama": _llama_like("llama"),
        "mistral": _llama_like("mistral"),
        "qwen2": _llama_like("qwen2"),
        "qwen3": _llama_like("qwen3"),  # q_norm/k_norm act per head after q/k: groups unaffected
        "gemma": _llama_like("gemma", "rms_plus_one"),
        "gemma2": _llama_like("gemma2", "rms_plus_one", "pre_feedforward_layernorm"),
        "gemma3_text": _llama_like("gemma3_text", "rms_plus_one", "pre_feedforward_layernorm"),
        "gemma3": replace(_llama_like("gemma3", "rms_plus_one", "pre_feedforward_layernorm"),
                          blocks="language_model.layers", embeddings="language_model.embed_tokens",
                          final_norm="language_model.norm"),
        "phi3": _phi3(),
        "opt": _opt(pre_norm=True),
        "opt-post-ln": _opt(pre_norm=False),
        "gpt2": _gpt2(),
        "bert": _bert("bert", "cls.predictions.decoder"),
        "roberta": _bert("roberta", "lm_head.decoder"),
    }


def known_families() -> list[str]:
    """Sorted model_types that have facts."""
    return sorted(facts_table())


def _table_key(model_type: str, config: Any) -> str:
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        return "opt-post-ln"
    return model_type


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _base_prefix(model: nn.Module, blocks_path: str) -> str | None:
    """The dotted prefix ("" or "model." ...) under which ``blocks_path`` is a ModuleList, shortest first."""
    hits = [name for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and (name == blocks_path or name.endswith("." + blocks_path))]
    if not hits:
        return None
    best = min(hits, key=lambda n: (n.count("."), n))
    return best[: len(best) - len(blocks_path)]


def find_blocks(model: nn.Module) -> str:
    """Path of the ModuleList with most parameters whose children all share one class ("" if none)."""
    best, best_size = "", -1
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or name == "":
            continue
        if len({type(child) for child in m}) != 1:
            continue
        size = sum(p.numel() for p in m.parameters())
        if size > best_size:
            best, best_size = name, size
    return best


def arch_facts(model: nn.Module) -> ArchFacts:
    """Facts for ``model`` with full dotted paths (trunk prefixed, head only if it exists).

    Looked up by ``model.config.model_type``; an unknown type (or a plain module without a config,
    family = class name) gets ``ArchFacts(family, blocks=find_blocks(model))`` and nothing else.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    table = facts_table()
    base = table.get(_table_key(model_type, config))
    prefix = _base_prefix(model, base.blocks) if base is not None else None
    if base is None or prefix is None:
        return ArchFacts(family=model_type, blocks=find_blocks(model))

    def trunk(path: str | None) -> str | None:
        return prefix + path if path is not None and _exists(model, prefix + path) else None

    lm_head = base.lm_head if base.lm_head is not None and _exists(model, base.lm_head) else None
    return replace(base, blocks=prefix + base.blocks, embeddings=trunk(base.embeddings),
                   final_norm=trunk(base.final_norm), lm_head=lm_head)
