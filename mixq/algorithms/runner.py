"""The sequential runner: quantize a model block by block, following a plan.

Memory is bounded by one block: the calibration inputs of the current block (captured once at the
first block, then produced by the already quantized previous block), that block's statistics, and
the model's own weights. For each block:

1. one calibration pass through the float block gathers each layer's input statistics
   (:class:`~mixq.algorithms.layer_stats.LayerStats`: Hessian, channel maxima, mean, row sample);
2. AWQ / SmoothQuant scales are searched per scale group (norm -> linears) and folded into the
   weights, and the statistics are transformed exactly instead of re-measured;
3. each layer's weights are quantized (RTN, GPTQ, or AWQ's clip search then RTN), with optional bias
   correction and salient rows kept in 16 bits;
4. activation and KV quantizers of the block are switched on, and the quantized block is run on the
   calibration inputs to give the next block's inputs.

Layers outside the blocks (an LM head a plan quantizes, a CNN's stem and classifier) get one more
calibration pass through the whole model when their algorithm needs data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from mixq.algorithms.awq import awq_clip, awq_search
from mixq.algorithms.bias_correction import corrected_bias
from mixq.algorithms.gptq import gptq
from mixq.algorithms.hessian import layer_loss
from mixq.algorithms.hooks import RunHooks
from mixq.algorithms.layer_stats import LayerStats
from mixq.algorithms.report import LayerReport, QuantizeReport
from mixq.algorithms.rtn import rtn
from mixq.algorithms.salient import salient_rows
from mixq.algorithms.smoothquant import smooth_factors
from mixq.model.arch import ArchFacts, arch_facts
from mixq.model.capture import StopForward, capture_block_inputs, record_inputs
from mixq.model.fold import scale_input_channels, scale_output_channels
from mixq.model.plan_match import ResolvedLayer, ResolvedPlan, count_bits, resolve
from mixq.model.qmodules import inner, quantizers
from mixq.model.quantizers import install_quantizers, untie_lm_head
from mixq.model.tree import blocks, get_module, input_matrix, set_weight_matrix, weight_matrix
from mixq.plan import Plan, PlanError
from mixq.quant.scale import GroupScales

Progress = Callable[[str, int, int], None]
AWQ_SAMPLE_ROWS = 4096


def default_forward(model: nn.Module, batch: Tensor) -> Any:
    """Run ``model`` on a calibration batch: token ids ``[b, T]`` (int) or images/features (float)."""
    if batch.dtype in (torch.int32, torch.int64):
        return model(input_ids=batch, use_cache=False) if _is_causal_lm(model) else model(input_ids=batch)
    return model(batch)


def _is_causal_lm(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "use_cache", False)) or hasattr(model, "lm_head")


def _needs_data(spec_row: ResolvedLayer) -> bool:
    s = spec_row.spec
    o = s.options
    return (s.algorithm in ("gptq", "awq") or s.static_inputs or o.smooth_alpha is not None
            or o.bias_correction or o.salient > 0)


def needs_calibration(resolved: ResolvedPlan) -> bool:
    """Whether any layer of the plan uses calibration data."""
    return any(r.kind != "attention" and _needs_data(r) for r in resolved.layers)


def _block_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple | list) else out


class _Walker:
    """State of one quantization run (the model, the resolved plan, calibration inputs)."""

    def __init__(self, model: nn.Module, resolved: ResolvedPlan, calib: Tensor | None, batch_size: int,
                 forward: Callable[[nn.Module, Tensor], Any], progress: Progress | None,
                 hooks: RunHooks | None = None) -> None:
        self.model = model
        self.hooks = hooks or RunHooks()
        self.resolved = resolved
        self.rows = {r.name: r for r in resolved.layers if r.kind != "attention"}
        self.calib = calib
        self.batch_size = batch_size
        self.forward = forward
        self.progress = progress or (lambda stage, done, total: None)
        self.reports: dict[str, LayerReport] = {}
        self.scales: dict[str, GroupScales | None] = {}
        self.facts: ArchFacts = arch_facts(model)

    # --- calibration data ----------------------------------------------------------------------
    def batches(self) -> Iterator[Tensor]:
        assert self.calib is not None
        for i in range(0, self.calib.shape[0], self.batch_size):
            yield self.calib[i:i + self.batch_size]

    def capture(self, block: nn.Module) -> list[tuple[tuple, dict]]:
        with capture_block_inputs(block) as captured:
            for batch in self.batches():
                try:
                    self.forward(self.model, batch)
                except StopForward:
                    pass
        return captured

    # --- one group of layers ---------------------------------------------------------------------
    def collect(self, names: list[str], run: Callable[[], None]) -> dict[str, LayerStats]:
        """Statistics of the inputs of layers ``names`` while ``run()`` drives the model.

        Layers that read the same input (q/k/v after one norm, gate/up) share one
        :class:`LayerStats`, so each Hessian is accumulated once.
        """
        share = self.shared_inputs(names)
        awq_first = self.awq_sampled_layers(names)
        stats: dict[str, LayerStats] = {}
        for rep in dict.fromkeys(share.values()):
            members = [self.rows[n] for n in names if share[n] == rep]
            stats[rep] = LayerStats(
                members[0].shape[1],
                hessian=any(r.spec.algorithm == "gptq" or r.spec.options.salient > 0 for r in members),
                absmax=any(r.spec.options.smooth_alpha is not None for r in members),
                mean=any(r.spec.options.bias_correction for r in members),
                sample_rows=AWQ_SAMPLE_ROWS if any(r.spec.algorithm == "awq" or r.name in awq_first
                                                   for r in members) else 0)
        # convs give im2col rows; grouped convs have no per-group Hessian (RTN, noted by resolve)
        modules = {rep: inner(get_module(self.model, rep)) for rep in stats}
        modules = {rep: m for rep, m in modules.items() if getattr(m, "groups", 1) == 1}
        for q in quantizers(self.model):
            q.observing = False
        observed = [get_module(self.model, n).inputs for n in names if self.rows[n].spec.static_inputs]
        for q in observed:
            q.observing = True
        with record_inputs(modules, lambda n, x: stats[n].add(input_matrix(modules[n], x))):
            run()
        for q in observed:
            q.observing = False
        self.hooks.reduce_stats(list({id(s): s for s in stats.values()}.values()))
        if observed:
            self.hooks.reduce_observers(observed)
        return {n: stats[share[n]] for n in names}

    def shared_inputs(self, names: list[str]) -> dict[str, str]:
        """Each layer's representative: the first layer of its scale group when all read one input."""
        share = {n: n for n in names}
        for prefix, group in self.scale_groups(names):
            members = [f"{prefix}{lin}" for lin in group.linears]
            rotations = {(self.rows[m].hadamard, self.rows[m].spec.options.hadamard_seed) for m in members}
            if len(rotations) == 1:
                for m in members:
                    share[m] = members[0]
        return share

    def awq_sampled_layers(self, names: list[str]) -> set[str]:
        """First linear of each scale group with an AWQ member (its inputs are the group's inputs)."""
        out = set()
        for prefix, group in self.scale_groups(names):
            members = [f"{prefix}{lin}" for lin in group.linears]
            if any(self.rows[m].spec.algorithm == "awq" for m in members if m in self.rows):
                out.add(members[0])
        return out

    def scale_groups(self, names: list[str]) -> Iterator[tuple[str, Any]]:
        """(block prefix, ScaleGroup) for groups whose linears all lie among ``names``."""
        present = set(names)
        for block_name, _ in self.block_list():
            prefix = f"{block_name}."
            for group in self.facts.scale_groups:
                members = [f"{prefix}{lin}" for lin in group.linears]
                if all(m in present for m in members):
                    yield prefix, group

    def block_list(self) -> list[tuple[str, nn.Module]]:
        return blocks(self.model, self.facts) if self.facts.blocks else []

    def smooth(self, names: list[str], stats: dict[str, LayerStats]) -> None:
        """Search and fold AWQ / SmoothQuant scales for every scale group among ``names``."""
        for prefix, group in self.scale_groups(names):
            members = [f"{prefix}{lin}" for lin in group.linears]
            specs = [self.rows[m].spec for m in members]
            awq = [s for s in specs if s.algorithm == "awq"]
            alphas = [s.options.smooth_alpha for s in specs if s.options.smooth_alpha is not None]
            if not awq and not alphas:
                continue
            prev = get_module(self.model, f"{prefix}{group.prev}")
            prev_out = _out_features(inner(prev))
            linears = [inner(get_module(self.model, m)) for m in members]
            Ws = [weight_matrix(lin) for lin in linears]
            if prev_out != Ws[0].shape[1]:
                for m in members:
                    self.note(m, f"scale group {group.prev}->{m.rsplit('.', 1)[-1]} skipped: "
                                 f"{prev_out} outputs feed {Ws[0].shape[1]} inputs (grouped-query attention)")
                continue
            if awq:
                result = awq_search(stats[members[0]].sample, Ws, awq[0].weights, grid=awq[0].options.awq_grid)
                s = result.scales
                for m in members:
                    self.note(m, f"awq alpha={result.alpha:.2f} loss {result.loss_before:.4g}->{result.loss:.4g}")
            else:
                absmax = next(stats[m].absmax for m in members if stats[m].absmax is not None)
                s = smooth_factors(absmax, Ws, alphas[0])
                for m in members:
                    self.note(m, f"smoothquant alpha={alphas[0]}")
            scale_output_channels(inner(prev), s, self.facts.norm_kind or "rms")
            for st in {id(stats[m]): stats[m] for m in members}.values():
                st.rescale(s)
            for lin, m in zip(linears, members):
                scale_input_channels(lin, s)
                q = getattr(get_module(self.model, m), "inputs", None)
                if q is not None:
                    q.rescale(s)

    def quantize_layer(self, name: str, st: LayerStats | None) -> None:
        row = self.rows[name]
        spec, opts = row.spec, row.spec.options
        if spec.weights is None:
            return
        module = inner(get_module(self.model, name))
        t0 = time.perf_counter()
        W0 = weight_matrix(module)  # [out, in] fp32
        W = W0
        algorithm = spec.algorithm
        grouped = getattr(module, "groups", 1) > 1
        H = st.H if st is not None and not grouped else None
        if grouped or (algorithm == "gptq" and H is None):
            algorithm = "rtn"  # grouped convs: noted by resolve(); GPTQ without data cannot run
        if algorithm == "gptq":
            result = gptq(W, H, spec.weights, block_size=opts.block_size, damp=opts.damp,
                          act_order=opts.act_order, static_groups=opts.static_groups)
        else:
            if algorithm == "awq" and st is not None and st.sample is not None and opts.awq_clip:
                W = awq_clip(W, st.sample, spec.weights, grid=opts.awq_grid)
            result = rtn(W, spec.weights, H)
        Wq = result.weight
        self.scales[name] = result.info.get("scales") if opts.salient <= 0 else None
        if opts.salient > 0:
            rows = salient_rows(W0, Wq, H, opts.salient)
            Wq = Wq.clone()
            Wq[rows] = W0[rows].to(torch.float16).float()
        if opts.bias_correction:
            bias = getattr(module, "bias", None)
            if bias is None:
                self.note(name, "bias correction skipped: the layer has no bias")
            elif st is not None and st.mean is not None:
                with torch.no_grad():
                    bias.copy_(corrected_bias(W0, Wq, st.mean, bias.detach().float()).to(bias.dtype))
        set_weight_matrix(module, Wq)
        loss = rtn_loss = None
        if H is not None:
            plain = Wq is result.weight and W is W0  # no clipping, no salient rows
            loss = result.loss if plain else layer_loss(W0, Wq, H)
            rtn_loss = loss if plain and algorithm == "rtn" else rtn(W0, spec.weights, H).loss
        report = self.report_for(name)
        report.algorithm = algorithm
        report.loss, report.rtn_loss = loss, rtn_loss
        report.error = float(((W0 - Wq) ** 2).sum())  # fp32 sum: a report figure, not a test oracle
        report.seconds = time.perf_counter() - t0

    def report_for(self, name: str) -> LayerReport:
        if name not in self.reports:
            row = self.rows[name]
            self.reports[name] = LayerReport(name, row.spec.describe(), row.spec.algorithm, 0.0,
                                             notes=list(row.notes))
        return self.reports[name]

    def note(self, name: str, text: str) -> None:
        self.report_for(name).notes.append(text)


def _out_features(module: nn.Module) -> int:
    """Output channels of a norm (1-D weight) or a linear-like module."""
    weight = module.weight
    return int(weight.shape[0]) if weight.dim() == 1 else int(weight_matrix(module).shape[0])


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def quantize_model(model: nn.Module, plan: Plan | ResolvedPlan, calib: Tensor | None = None, *,
                   batch_size: int = 8, rotate: str | None = None, rotate_seed: int | None = None,
                   forward: Callable[[nn.Module, Tensor], Any] = default_forward,
                   progress: Progress | None = None, hooks: RunHooks | None = None) -> QuantizeReport:
    """Quantize ``model`` in place following ``plan``; returns the report.

    ``calib``: calibration inputs, ``[n, T]`` token ids or ``[n, ...]`` float inputs (needed when a
    layer's algorithm or options use data). ``rotate``: offline rotation of the residual stream
    (``hadamard`` | ``random``) folded into the weights first. Errors in the plan (a spec that does
    not fit a layer, a missing architecture fact) are raised before any calibration. ``hooks``:
    where a streamed or data-parallel run plugs in (:mod:`mixq.algorithms.hooks`).
    """
    t0 = time.perf_counter()
    resolved = plan if isinstance(plan, ResolvedPlan) else resolve(plan, model)
    needs = [r.name for r in resolved.layers if r.kind != "attention" and _needs_data(r)]
    if needs and calib is None:
        raise PlanError(f"layers {needs[:3]}{'...' if len(needs) > 3 else ''} need calibration data "
                        "(GPTQ, AWQ, SmoothQuant, static inputs, bias correction or salient rows)")
    facts = arch_facts(model)
    if any(r.spec.algorithm == "awq" or r.spec.options.smooth_alpha is not None for r in resolved.layers):
        facts.require("scale_groups", "AWQ / SmoothQuant")
    rotation = None
    with _eval_no_grad(model):
        if rotate:
            from mixq.model.rotate import rotate as rotate_residual

            rotation = vars(rotate_residual(model, kind=rotate, seed=rotate_seed))
        untie_lm_head(model, resolved)
        install_quantizers(model, resolved, rotate_weights=True)
        walker = _Walker(model, resolved, calib, batch_size, forward, progress, hooks)
        for row in resolved.layers:
            if row.kind != "attention" and row.spec.weights is not None:
                walker.report_for(row.name)
        _walk_blocks(walker)
        _finish_outside(walker)
        for q in quantizers(model):
            q.enabled = True
    bits = count_bits(resolved)
    for r in walker.reports.values():
        row = walker.rows[r.name]
        r.bits_per_weight = count_bits(ResolvedPlan(resolved.plan, (row,))).get("quantized_bits_per_weight", 0.0)
    calibration = {"samples": int(calib.shape[0]) if calib is not None else 0,
                   "shape": list(calib.shape) if calib is not None else None}
    return QuantizeReport(list(walker.reports.values()), bits, time.perf_counter() - t0, calibration,
                          list(resolved.warnings), rotation, walker.scales)


def _walk_blocks(w: _Walker) -> None:
    block_list = w.block_list()
    in_blocks = [r for r in w.rows.values() if any(r.name.startswith(f"{b}.") for b, _ in block_list)]
    data_needed = w.calib is not None and any(_needs_data(r) for r in in_blocks)
    if not block_list:
        return
    first, inputs = w.hooks.start([b for b, _ in block_list])
    if inputs is None:
        inputs = w.capture(block_list[first][1]) if data_needed else []
    for i, (block_name, block) in enumerate(block_list):
        if i < first:
            continue
        w.progress("blocks", i, len(block_list))
        w.hooks.enter_block(i, block_name, block)
        names = [n for n in w.rows if n.startswith(f"{block_name}.")]
        use_data = data_needed and any(_needs_data(w.rows[n]) for n in names)
        stats: dict[str, LayerStats] = {}
        if use_data:
            stats = w.collect(names, lambda: [block(*a, **k) for a, k in inputs])
            w.smooth(names, stats)
        for name in names:
            w.quantize_layer(name, stats.get(name))
        for q in quantizers(block):
            q.enabled = True
        del stats
        if data_needed:
            inputs = [((_block_output(block(*a, **k)),) + tuple(a[1:]), k) for a, k in inputs]
        last = i + 1 == len(block_list)
        w.hooks.block_results(i, block_name, {n: w.reports[n] for n in names if n in w.reports},
                              {n: w.scales[n] for n in names if n in w.scales})
        w.hooks.leave_block(i, block_name, block, None if last or not data_needed else inputs)
        if last and data_needed:
            w.hooks.final_hidden([a[0] for a, _ in inputs])
    w.progress("blocks", len(block_list), len(block_list))


def _finish_outside(w: _Walker) -> None:
    """Layers outside every block: one whole-model calibration pass if any of them needs data."""
    block_names = [b for b, _ in w.block_list()]
    rest = [n for n in w.rows if not any(n.startswith(f"{b}.") for b in block_names)]
    if not rest:
        return
    stats: dict[str, LayerStats] = {}
    if w.calib is not None and any(_needs_data(w.rows[n]) for n in rest):
        w.progress("outside blocks", 0, 1)
        stats = w.collect(rest, lambda: [w.forward(w.model, b) for b in w.batches()])
        w.smooth(rest, stats)
    for name in rest:
        w.quantize_layer(name, stats.get(name))
    w.progress("outside blocks", 1, 1)
