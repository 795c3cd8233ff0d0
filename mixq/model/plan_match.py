"""Match a plan against a model: the per-module table, with every error a plan can cause found up front.

``resolve(plan, model)`` walks the quantizable modules (linear, Conv1D, conv) and the attention
modules of the blocks, gives each the layer spec of the first matching rule, and checks that every
spec fits its module (group sizes divide the weight, Hadamard blocks divide the inputs) before any
calibration starts. Rules that match nothing become warnings that name the closest module names.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

from torch import nn

from mixq.model.arch import ArchFacts, arch_facts
from mixq.model.tree import blocks, quantizable_modules, weight_matrix
from mixq.plan import LayerSpec, Plan, PlanError
from mixq.quant.granularity import GroupSizeError, Grouping, PerGroup


@dataclass(frozen=True)
class ResolvedLayer:
    """One module of the model and what the plan does to it.

    ``kind``: ``linear`` | ``conv`` | ``attention``. ``shape``: the weight matrix ``[out, in]``
    (attention: the K projection's ``[out, in]``). ``rule``: index of the matching rule (None: no rule
    matched, the module is kept). ``hadamard``: the resolved online-rotation block (0: none).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    spec: LayerSpec
    rule: int | None
    hadamard: int = 0
    notes: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        if self.kind == "attention":
            return self.spec.kv is not None
        return self.spec.weights is not None or self.spec.inputs is not None


@dataclass(frozen=True)
class ResolvedPlan:
    """The plan applied to one model: a row per module, and the warnings found while matching."""

    plan: Plan
    layers: tuple[ResolvedLayer, ...]
    warnings: tuple[str, ...] = field(default=())

    def by_name(self) -> dict[str, ResolvedLayer]:
        return {layer.name: layer for layer in self.layers}

    def table(self) -> list[dict[str, object]]:
        """JSON-ready rows: name, kind, shape, spec, rule, notes."""
        return [{"name": r.name, "kind": r.kind, "shape": list(r.shape), "spec": r.spec.describe(),
                 "rule": r.rule, "notes": list(r.notes)} for r in self.layers]


def _block_of(group: object) -> int:
    return group.size if isinstance(group, PerGroup) else 0


def _hadamard_block(name: str, spec: LayerSpec, in_features: int) -> int:
    block = spec.options.hadamard
    if block == -1:
        block = _block_of(spec.weights.granularity) if spec.weights is not None else 0
        if block <= 0 or block & (block - 1):
            raise PlanError(f"layer {name}: hadamard=-1 takes the block size of the weight spec "
                            f"{spec.weights}, which has no power-of-two group; give the block size")
    if block and in_features % block:
        raise PlanError(f"layer {name}: Hadamard block {block} does not divide its {in_features} inputs")
    return block


def _check_fits(name: str, shape: tuple[int, ...], spec: LayerSpec, kind: str) -> None:
    try:
        if spec.weights is not None:
            Grouping(shape, spec.weights.granularity)
        if spec.inputs is not None:
            Grouping((1, shape[1]), spec.inputs.granularity)
    except GroupSizeError as err:
        raise PlanError(f"layer {name} (weight {list(shape)}): {err}") from err
    if spec.inputs is not None and kind != "linear":
        raise PlanError(f"layer {name}: input quantization is supported on linear layers, not {kind} layers")


def _linear_kind(module: nn.Module) -> str:
    return "conv" if isinstance(module, nn.Conv1d | nn.Conv2d) else "linear"


def _tied_note(model: nn.Module, name: str, module: nn.Module, facts: ArchFacts, spec: LayerSpec) -> tuple[str, ...]:
    emb_name = facts.embeddings
    if emb_name is None or name != facts.lm_head:
        return ()
    try:
        emb = model.get_submodule(emb_name)
    except AttributeError:
        return ()
    if getattr(emb, "weight", None) is not getattr(module, "weight", None):
        return ()
    if spec.weights is None:
        return (f"tied to {emb_name}; kept",)
    return (f"tied to {emb_name}: untied before quantizing, the embedding stays in full precision",)


def resolve(plan: Plan, model: nn.Module) -> ResolvedPlan:
    """The per-module table of ``plan`` on ``model``; raises :class:`PlanError` naming layer and shape."""
    facts = arch_facts(model)
    rows: list[ResolvedLayer] = []
    used: set[int] = set()
    for name, module in quantizable_modules(model).items():
        spec, rule = plan.spec_for(name)
        kind = _linear_kind(module)
        shape = tuple(weight_matrix(module).shape)
        if rule is not None:
            used.add(rule)
        spec = LayerSpec(spec.weights, spec.inputs, spec.static_inputs, None, spec.algorithm, spec.options) \
            if spec.kv is not None else spec
        _check_fits(name, shape, spec, kind)
        notes = list(_tied_note(model, name, module, facts, spec))
        if kind == "conv" and spec.weights is not None and spec.algorithm != "rtn" and getattr(module, "groups", 1) > 1:
            notes.append(f"grouped conv ({module.groups} groups): {spec.algorithm} needs one Hessian per "
                         "group; RTN is used")
        block = _hadamard_block(name, spec, shape[1]) if spec.weights is not None else 0
        rows.append(ResolvedLayer(name, kind, shape, spec, rule, block, tuple(notes)))
    rows.extend(_attention_rows(plan, model, facts, used))
    names = [r.name for r in rows]
    warnings = [_unmatched(plan.rules[i].pattern, names) for i in range(len(plan.rules)) if i not in used]
    kv_given = {r.rule for r in rows if r.kind == "attention"}
    warnings += [f"rule {rule.pattern!r} gives a KV-cache spec that no attention module takes from it (KV "
                 f"specs apply to the blocks' {facts.attention!r} modules); its kv is not applied"
                 for i, rule in enumerate(plan.rules)
                 if rule.spec.kv is not None and i in used and i not in kv_given]
    return ResolvedPlan(plan, tuple(rows), tuple(warnings))


def _attention_rows(plan: Plan, model: nn.Module, facts: ArchFacts, used: set[int]) -> list[ResolvedLayer]:
    """Rows for attention modules that a rule gives a KV-cache spec (and only those)."""
    if not any(rule.spec.kv is not None for rule in plan.rules):
        return []
    attention = facts.require("attention")
    k_name, _ = facts.require("kv_projections")
    rows = []
    for block_name, block in blocks(model, facts):
        name = f"{block_name}.{attention}"
        spec, rule = plan.spec_for(name)
        if spec.kv is None:
            continue
        used.add(rule)  # type: ignore[arg-type]
        k_proj = block.get_submodule(k_name)
        shape = tuple(weight_matrix(k_proj).shape)
        try:
            Grouping((1, shape[0]), spec.kv.granularity)
        except GroupSizeError as err:
            raise PlanError(f"KV cache of {name} (K/V width {shape[0]}): {err}") from err
        rows.append(ResolvedLayer(name, "attention", shape, LayerSpec(kv=spec.kv), rule))
    return rows


def _unmatched(pattern: str, names: list[str]) -> str:
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return f"rule {pattern!r} matched no module{hint}"


def count_bits(resolved: ResolvedPlan) -> dict[str, float]:
    """Bits of the quantized weights, every scale counted; kept linear layers counted at 16 bits.

    Returns ``quantized_bits_per_weight`` (over quantized layers), ``bits_per_weight`` (over all
    linear-like layers, kept ones at 16 bits), ``quantized_params`` and ``params``.
    """
    from mixq.quant.accounting import bit_count

    q_bits = q_params = all_bits = all_params = 0.0
    for row in resolved.layers:
        if row.kind == "attention":
            continue
        numel = row.shape[0] * row.shape[1]
        if row.spec.weights is not None:
            salient = row.spec.options.salient
            k = math.ceil(salient * row.shape[0]) if salient else 0
            bits = bit_count(row.spec.weights, row.shape).total * (row.shape[0] - k) / row.shape[0]
            bits += k * row.shape[1] * 16 + k * 32  # salient rows in 16 bits plus a 32-bit row index each
            q_bits += bits
            q_params += numel
        else:
            bits = numel * 16.0
        all_bits += bits
        all_params += numel
    return {
        "quantized_bits_per_weight": q_bits / q_params if q_params else 0.0,
        "bits_per_weight": all_bits / all_params if all_params else 0.0,
        "quantized_params": q_params,
        "params": all_params,
    }
