"""Profile a model: score every (layer, candidate) pair under several sensitivity metrics.

Metrics (all: degradation, larger = worse, 0 for ``keep``, NaN where a candidate does not fit):

- ``weight``:  data-free ``sum (Q(W) - W)^2``;
- ``fisher``:  ``0.5 * sum F ⊙ ΔW^2`` with the empirical Fisher ``F`` of batch-mean gradients (one
  backward per batch), plus ``0.5 * sum (dL/dx)^2 ⊙ (x - Q(x))^2`` for candidates that quantize the
  layer's inputs;
- ``fisher_model``: ``0.5 * sum F ⊙ ΔW^2`` with the per-token diagonal Fisher of the model's own
  distribution (sampled labels, :mod:`mixq.sensitivity.model_fisher`): a predicted KL in nats per token
  (weights only);
- ``hessian``: HAWQ-V2 ``0.5 * tr(H)/n * sum ΔW^2`` with Hutchinson traces (weights only);
- ``kl``:      measured KL to the fp32 outputs (LM) or 1 - cosine of pooled embeddings (encoder)
  with only that layer quantized (see :mod:`mixq.sensitivity.measured`).

Loss: LM next-token cross-entropy. Encoder: Fisher uses ``sum(eps ⊙ pooled(f(x)))`` with
``eps ~ N(0, 1)`` fixed per batch (seeded), a sampled Gauss-Newton surrogate; the Hessian uses
``0.5 * ||pooled(f(x)) - pooled_ref||^2`` whose Hessian at the fp32 weights is ``J^T J``.
Shared passes (Fisher, Hessian, the block cache) are timed and split evenly over the scored pairs;
each pair adds its own quantization (and measurement) time.

A sharded profile (several processes, :mod:`mixq.dist.profile_shard`) plugs in through
:class:`ProfileHooks`: the empirical Fisher pass runs data-parallel over batch shards and is
combined, the scored pairs are split between the processes and their scores gathered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mixq.model.arch import arch_facts
from mixq.model.tree import blocks, get_module, quantizable_modules, weight_matrix
from mixq.plan.candidates import Candidate
from mixq.plan.plan import pattern_matches
from mixq.quant import QuantSpec
from mixq.sensitivity.gradients import fisher_stats, hessian_traces
from mixq.sensitivity.measured import OutputCache
from mixq.sensitivity.model_fisher import model_fisher
from mixq.sensitivity.outputs import (ProfileInputError, check_batches, eval_mode, lm_loss, model_device, model_forward,
                                      pooled, to_device, token_count)
from mixq.sensitivity.table import LayerInfo, SensitivityTable, model_fingerprint
from mixq.sensitivity.weight_error import (fisher_weight_term, hessian_score, quantized_weight, squared_error,
                                           weight_delta)

Progress = Callable[[str, int, int], None]
METRICS = ("weight", "fisher", "fisher_model", "hessian", "kl")


def profile_layers(model: nn.Module, keep: Sequence[str] = ("lm_head",)) -> list[LayerInfo]:
    """Quantizable modules not matching a ``keep`` pattern (glob or ``re:REGEX``), in module order.

    Layers of one architecture scale group with at least two linears (q/k/v after the input norm,
    gate/up) all profiled get ``group = f"{block}.{group.prev}"``; others (and unknown families) None.
    """
    mods = {n: m for n, m in quantizable_modules(model).items() if not any(pattern_matches(p, n) for p in keep)}
    facts = arch_facts(model)
    group_of: dict[str, str] = {}
    if facts.blocks and facts.scale_groups:
        for block_name, _ in blocks(model, facts):
            for g in facts.scale_groups:
                members = [f"{block_name}.{lin}" for lin in g.linears]
                if len(members) > 1 and all(m in mods for m in members):
                    for m in members:
                        group_of.setdefault(m, f"{block_name}.{g.prev}")
    out = []
    for name, module in mods.items():
        shape = tuple(int(s) for s in weight_matrix(module).shape)
        out.append(LayerInfo(name, (shape[0], shape[1]), shape[0] * shape[1], group_of.get(name)))
    return out


def _loss_fns(kind: str, seed: int) -> tuple[Callable, Callable]:
    """(fisher loss, hessian loss), each ``(model, batch, index) -> scalar``."""
    if kind == "lm":
        def lm(model: nn.Module, batch: dict[str, Tensor], index: int) -> Tensor:
            return lm_loss(model_forward(model, batch, "lm"), batch)
        return lm, lm

    def surrogate(model: nn.Module, batch: dict[str, Tensor], index: int) -> Tensor:
        e = pooled(model_forward(model, batch, "encoder"), batch["attention_mask"])  # [B, D]
        g = torch.Generator().manual_seed(seed * 100003 + index)
        eps = torch.randn(e.shape, generator=g).to(e.device)  # [B, D]
        return (eps * e).sum()

    refs: dict[int, Tensor] = {}

    def gauss_newton(model: nn.Module, batch: dict[str, Tensor], index: int) -> Tensor:
        if index not in refs:
            with torch.no_grad():
                refs[index] = pooled(model_forward(model, batch, "encoder"), batch["attention_mask"])
        e = pooled(model_forward(model, batch, "encoder"), batch["attention_mask"])  # [B, D]
        return 0.5 * ((e - refs[index]) ** 2).sum()

    return surrogate, gauss_newton


def _fit_notes(layers: list[LayerInfo], candidates: Sequence[Candidate]) -> tuple[np.ndarray, list[str]]:
    ok = np.ones((len(layers), len(candidates)), dtype=bool)
    notes = []
    for i, layer in enumerate(layers):
        for j, cand in enumerate(candidates):
            why = cand.fits(layer.shape)
            if why is not None:
                ok[i, j] = False
                prefix = f"{cand.name} does not fit weight {list(layer.shape)}: "
                detail = why[len(prefix):] if why.startswith(prefix) else why
                notes.append(f"{cand.name} does not fit {layer.name} (weight {list(layer.shape)}): {detail}")
    return ok, notes


def _check_options(candidates: Sequence[Candidate], metrics: Sequence[str], hutchinson_samples: int) -> None:
    if not candidates:
        raise ProfileInputError("expected at least one candidate, found none")
    bad = [m for m in metrics if m not in METRICS]
    if not metrics or bad:
        raise ProfileInputError(f"expected metrics among {', '.join(METRICS)}, found {list(metrics) or 'none'}")
    if len(set(metrics)) != len(metrics):
        raise ProfileInputError(f"metrics repeat: {list(metrics)}")
    if "hessian" in metrics and hutchinson_samples < 1:
        raise ProfileInputError(f"expected hutchinson_samples >= 1, found {hutchinson_samples}")


class ProfileHooks:
    """Where a sharded profile plugs in; the defaults make one process do everything."""

    def batch_range(self, n: int) -> tuple[int, int]:
        """``(start, stop)``: the batches (of ``n``) this process uses for the empirical Fisher pass."""
        return 0, n

    def combine_fisher(self, F: dict[str, Tensor], x_terms: dict[str, list[float]], n_local: int,
                       n_total: int) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
        """The Fisher means over all ``n_total`` batches from this process's means over ``n_local``."""
        return F, x_terms

    def owns(self, pair: int) -> bool:
        """Whether this process scores the ``pair``-th scored (layer, candidate) pair."""
        return True

    def gather(self, scores: dict[str, np.ndarray], seconds: dict[str, np.ndarray],
               owned: list[tuple[int, int]]) -> None:
        """Fill in place the ``[L, C]`` entries of the pairs other processes scored (``owned``: ours)."""


def profile(model: nn.Module, candidates: Sequence[Candidate], batches: Sequence[dict[str, Tensor]], *,
            kind: str = "lm", metrics: Sequence[str] = ("weight", "fisher", "fisher_model"),
            keep: Sequence[str] = ("lm_head",), model_name: str = "", hutchinson_samples: int = 4, seed: int = 0,
            progress: Progress | None = None, hooks: ProfileHooks | None = None) -> SensitivityTable:
    """Score every profiled layer × candidate under ``metrics``; the model is left exactly as it was.

    ``batches``: dicts of ``[B, T]`` tensors (``input_ids``; ``attention_mask`` required for encoders).
    ``kind``: ``lm`` (causal LM with ``lm_head``) | ``encoder`` (``last_hidden_state``). Pairs that do not
    fit score NaN in every metric and get a note. Returns a :class:`SensitivityTable` with scores and
    seconds ``[L, C]`` per metric. ``hooks``: where a sharded profile plugs in (:class:`ProfileHooks`).
    """
    t_start = time.perf_counter()
    hooks = hooks or ProfileHooks()
    metrics = list(metrics)
    _check_options(candidates, metrics, hutchinson_samples)
    data_metrics = [m for m in metrics if m != "weight"]
    if data_metrics or batches:
        check_batches(batches, kind)
    report = progress or (lambda stage, done, total: None)
    layers = profile_layers(model, keep)
    if not layers:
        raise ProfileInputError(f"no quantizable layer left to profile (keep patterns {list(keep)})")
    modules = {layer.name: get_module(model, layer.name) for layer in layers}
    ok, notes = _fit_notes(layers, candidates)
    scored = [(i, j) for i in range(len(layers)) for j, c in enumerate(candidates) if ok[i, j] and not c.is_keep]
    n_pairs = max(len(scored), 1)
    shape = (len(layers), len(candidates))
    scores = {m: np.where(ok, 0.0, np.nan) for m in metrics}
    seconds = {m: np.zeros(shape) for m in metrics}
    shared = {m: 0.0 for m in metrics}
    device = model_device(model)
    data = [to_device(b, device) for b in batches]
    fisher_loss, hessian_loss = _loss_fns(kind, seed)
    input_specs: dict[str, list[QuantSpec]] = {}
    for i, layer in enumerate(layers):
        specs: list[QuantSpec] = []
        for j, c in enumerate(candidates):
            if ok[i, j] and c.spec.inputs is not None and c.spec.inputs not in specs:
                specs.append(c.spec.inputs)
        input_specs[layer.name] = specs

    with eval_mode(model):
        F: dict[str, Tensor] = {}
        x_terms: dict[str, list[float]] = {}
        traces: dict[str, float] = {}
        cache: OutputCache | None = None
        if "fisher" in metrics:
            t0 = time.perf_counter()
            lo, hi = hooks.batch_range(len(data))
            loss_fn = fisher_loss if lo == 0 else (lambda m, b, index: fisher_loss(m, b, index + lo))
            F, x_terms = fisher_stats(model, modules, data[lo:hi], loss_fn, input_specs, progress)
            F, x_terms = hooks.combine_fisher(F, x_terms, hi - lo, len(data))
            shared["fisher"] = time.perf_counter() - t0
        FM: dict[str, Tensor] = {}
        if "fisher_model" in metrics:
            t0 = time.perf_counter()
            FM = model_fisher(model, modules, data, kind=kind, seed=seed, progress=progress)
            shared["fisher_model"] = time.perf_counter() - t0
            notes += [f"fisher_model: {n} is a grouped conv with no per-sample Fisher; scored NaN (kept)"
                      for n in modules if n not in FM]
        if "hessian" in metrics:
            t0 = time.perf_counter()
            traces = hessian_traces(model, modules, data, hessian_loss, hutchinson_samples, seed, progress)
            shared["hessian"] = time.perf_counter() - t0
        if "kl" in metrics:
            t0 = time.perf_counter()
            cache = OutputCache(model, data, kind, progress)
            shared["kl"] = time.perf_counter() - t0

        done = 0
        owned: list[tuple[int, int]] = []
        for i, layer in enumerate(layers):
            W = weight_matrix(modules[layer.name])  # [out, in] fp32
            for j, cand in enumerate(candidates):
                if not ok[i, j] or cand.is_keep:
                    continue
                if not hooks.owns(done):
                    done += 1
                    continue
                owned.append((i, j))
                report("pairs", done, len(scored))
                t0 = time.perf_counter()
                Wq = quantized_weight(W, cand)
                dW = weight_delta(W, Wq)
                err = squared_error(dW)
                t_q = time.perf_counter() - t0
                for m in metrics:
                    t1 = time.perf_counter()
                    if m == "weight":
                        value = err
                    elif m == "fisher":
                        value = fisher_weight_term(F[layer.name], dW)
                        if cand.spec.inputs is not None:
                            value += x_terms[layer.name][input_specs[layer.name].index(cand.spec.inputs)]
                    elif m == "fisher_model":
                        value = fisher_weight_term(FM[layer.name], dW) if layer.name in FM else float("nan")
                    elif m == "hessian":
                        value = hessian_score(traces[layer.name], layer.params, err)
                    else:
                        assert cache is not None
                        value = cache.measure(layer.name, Wq, cand.spec.inputs)
                    scores[m][i, j] = value
                    seconds[m][i, j] = t_q + (time.perf_counter() - t1) + shared[m] / n_pairs
                done += 1
            F.pop(layer.name, None)
            FM.pop(layer.name, None)
        report("pairs", len(scored), len(scored))
        del cache
    hooks.gather(scores, seconds, owned)

    meta = {"kind": kind, "metrics": metrics, "batches": len(batches),
            "tokens": token_count(batches) if batches else 0,
            "hutchinson_samples": hutchinson_samples if "hessian" in metrics else 0, "seed": seed,
            "keep": list(keep), "seconds": time.perf_counter() - t_start,
            "shared_seconds": dict(shared)}
    fingerprint = model_fingerprint([(layer.name, layer.shape) for layer in layers])
    return SensitivityTable(model_name, fingerprint, layers, [c.name for c in candidates], scores, seconds,
                            notes, None, meta)
