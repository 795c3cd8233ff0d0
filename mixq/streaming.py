"""Quantize a model larger than memory: weights read block by block from disk, written out, released.

:func:`quantize_streamed` is :func:`mixq.pipeline.quantize` for a model kept on disk. The model is a
skeleton on the meta device with only the tensors outside the blocks (embeddings, final norm, LM
head, rotary buffers) in memory. The sequential runner walks the blocks as usual; its hooks
(:class:`StreamHooks`) read each block's weights from the safetensors checkpoint when it is
entered, and when it is left write its quantized weights, scales, reports and the next block's
calibration inputs to a staging folder (:mod:`mixq.stream_stage`) and give the weights back to the
meta device. Peak memory is one block plus the calibration activations
(:mod:`mixq.stream_memory`). The numbers are those of the in-memory path: the same runner does the
same arithmetic on the same tensors, block by block.

An interrupted run resumes (``resume=True``) from the last completed block. An LM head that needs
data is calibrated from the last block's outputs through the final norm (the forward pass of the
in-memory path, stopped at the head's input).

Started by torchrun (``WORLD_SIZE`` > 1) the run is also data-parallel, as :func:`mixq.pipeline.quantize`
is: each rank calibrates on its contiguous share of the windows, :class:`~mixq.dist.DataParallelHooks`
combines the statistics around the :class:`StreamHooks`, every rank reads every block, and rank 0
alone writes the staging folder (every rank's inputs, :mod:`mixq.stream_ranks`) and the run folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

import mixq
from mixq.algorithms.hooks import BlockInputs, RunHooks
from mixq.dist.comm import Comm, process_group_from_env, shard_range
from mixq.dist.reduce import DataParallelHooks
from mixq.algorithms.runner import Progress, default_forward, needs_calibration, quantize_model
from mixq.model.arch import arch_facts
from mixq.model.capture import StopForward
from mixq.model.lazy import LazyCheckpoint, fill, meta_skeleton, release, tensor_of, tied_aliases, trim_heap
from mixq.model.load import resolve
from mixq.model.plan_match import ResolvedPlan
from mixq.model.plan_match import resolve as resolve_plan
from mixq.model.qmodules import ActQuantizer, QuantLinear, inner
from mixq.model.quantizers import hadamard_signs
from mixq.model.run_folder import META, PLAN, QUANTIZERS, SCALES, check_target
from mixq.algorithms.hadamard import block_hadamard
from mixq.model.tree import blocks, get_module, set_weight_matrix, weight_matrix
from mixq.pipeline import QuantizeOutcome, calibration_tokens, load_tokenizer, peak_rss_mb
from mixq.plan import Plan, PlanError
from mixq.stream_memory import estimate
from mixq.stream_ranks import SharedStaging, on_main
from mixq.stream_stage import RunKey, Staging, plan_hash, staging_folder, tokens_hash, write_shards


def _rows_need_data(resolved: ResolvedPlan, rows: list[Any]) -> bool:
    return needs_calibration(ResolvedPlan(resolved.plan, tuple(rows)))


class StreamHooks(RunHooks):
    """Runner hooks of a streamed run: fill a block from disk, stage it, release it."""

    def __init__(self, model: nn.Module, checkpoint: LazyCheckpoint, stage: SharedStaging,
                 resolved: ResolvedPlan, block_tensors: list[list[str]], *, blocks_data: bool,
                 outside_data: bool, batch_index: dict[int, int]) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.stage = stage
        self.resolved = resolved
        self.block_tensors = block_tensors
        self.blocks_data = blocks_data
        self.outside_data = outside_data
        self.batch_index = batch_index
        self.facts = arch_facts(model)
        self.final: list[Tensor] | None = None
        self.pending: tuple[dict, dict] = ({}, {})
        self.restored_scales: dict[str, Any] = {}
        self.restored_reports: dict[str, dict[str, Any]] = {}

    def start(self, block_names: list[str]) -> tuple[int, BlockInputs | None]:
        n = len(block_names)
        # after the last staged block; the last block again if killed before its outputs were staged
        first = self.stage.first_block(n, blocks_data=self.blocks_data, outside_data=self.outside_data)
        if first == n and self.outside_data:
            self.final = self.stage.load_final()
        for i in range(first):  # rank 0 only: the other ranks write nothing, so restore nothing
            ranges, scales, reports = self.stage.load_block_extras(i)
            for key, value in ranges.items():
                owner_name, attr = key.rsplit(".", 1)
                setattr(self.model.get_submodule(owner_name), attr, value)
            self.restored_scales.update(scales)
            self.restored_reports.update(reports)
        if first == 0:
            return 0, None
        if first < n and self.blocks_data:
            return first, self.stage.load_inputs(first)
        return first, []

    def enter_block(self, index: int, name: str, block: nn.Module) -> None:
        fill(self.model, self.checkpoint.read(self.block_tensors[index]))
        _rotate_online(self.model, self.resolved, name)

    def block_results(self, index: int, name: str, reports: dict, scales: dict) -> None:
        self.pending = ({n: dict(vars(r)) for n, r in reports.items()}, dict(scales))

    def leave_block(self, index: int, name: str, block: nn.Module, next_inputs: BlockInputs | None) -> None:
        names = self.block_tensors[index]
        if self.stage.is_main:
            weights = {n: tensor_of(self.model, n).detach().contiguous() for n in names}
            ranges = {f"{name}.{path}.{key}": getattr(q, key).detach().clone().contiguous()
                      for path, q in block.named_modules() if isinstance(q, ActQuantizer) and q.static
                      for key in ("lo", "hi")}
            reports, scales = self.pending
            self.stage.save_block(index, weights, ranges, scales, reports)
            del weights
        if next_inputs is not None:
            self.stage.save_inputs(index + 1, next_inputs)
        self.stage.mark_done(index + 1)
        if next_inputs is not None:
            self.stage.drop_inputs(index)
        release(self.model, names)
        trim_heap()

    def final_hidden(self, hidden: list[Tensor]) -> None:
        if self.outside_data:
            self.final = hidden
            self.stage.save_final(hidden)
        self.stage.drop_inputs(len(self.block_tensors) - 1)

    def forward(self, model: nn.Module, batch: Tensor) -> Any:
        """The runner's forward: the whole model while capturing the first block's inputs; after the
        blocks, the final norm and the LM head on the last block's outputs, stopped at the head's input."""
        if self.final is None:
            return default_forward(model, batch)
        hidden = self.final[self.batch_index[batch.data_ptr()]]
        head = get_module(model, self.facts.require("lm_head"))

        def stop(*_: Any) -> None:
            raise StopForward

        handle = inner(head).register_forward_pre_hook(stop)
        try:
            head(get_module(model, self.facts.require("final_norm"))(hidden))
        except StopForward:
            pass
        finally:
            handle.remove()
        return None


def quantize_streamed(model_name: str, plan: Plan, *, out: str | os.PathLike[str],
                      max_memory: int | None = None, resume: bool = False, calib: str | None = "wiki",
                      samples: int = 64, length: int = 512, seed: int = 0, batch_size: int = 8,
                      rotate: str | None = None, overwrite: bool = False, progress: Progress | None = None,
                      status: Callable[[str], None] | None = None) -> QuantizeOutcome:
    """Quantize ``model_name`` (a Hugging Face folder with safetensors weights, or ``smollm2``) block by
    block from disk into the run folder ``out``; the result equals :func:`mixq.pipeline.quantize`'s.

    ``max_memory``: budget in bytes for what the run allocates (see :mod:`mixq.stream_memory`); a
    smaller budget than the estimate raises :class:`~mixq.stream_memory.MemoryBudgetError` before any
    weight or calibration text is read. ``resume``: continue from ``OUT.partial`` if it holds the same
    run (else :class:`~mixq.stream_stage.ResumeError`). The outcome's ``model`` is the meta skeleton
    (blocks without weights); load ``out`` with :func:`~mixq.model.run_folder.load_quantized`.

    Under torchrun every rank calibrates on its share of the windows (the budget is per rank), only
    rank 0 writes, and the other ranks' outcome has ``out=None``; a resumed run needs the same number
    of ranks as the interrupted one.
    """
    with process_group_from_env() as comm:
        return _quantize_streamed(model_name, plan, comm, out=Path(out), max_memory=max_memory, resume=resume,
                                  calib=calib, samples=samples, length=length, seed=seed,
                                  batch_size=batch_size, rotate=rotate, overwrite=overwrite,
                                  progress=progress, status=status)


def _quantize_streamed(model_name: str, plan: Plan, comm: Comm, *, out: Path, max_memory: int | None,
                       resume: bool, calib: str | None, samples: int, length: int, seed: int, batch_size: int,
                       rotate: str | None, overwrite: bool, progress: Progress | None,
                       status: Callable[[str], None] | None) -> QuantizeOutcome:
    say = status or (lambda _m: None)
    if rotate:
        raise PlanError(f"expected no offline rotation in a streamed run, found rotate={rotate!r}: it "
                        "rewrites every block up front; use the online Hadamard (--hadamard) or the "
                        "in-memory path")
    ranks = comm.world_size
    if ranks > 1 and calib is not None and samples < ranks:
        raise ValueError(f"expected at least one calibration window per rank, found {samples} windows "
                         f"for {ranks} ranks: raise --samples or start fewer processes")
    t0 = time.perf_counter()
    folder = resolve(model_name, status=say)
    check_target(out, folder, overwrite)
    checkpoint = LazyCheckpoint(folder)
    model = meta_skeleton(folder)
    tokenizer = load_tokenizer(model_name)
    resolved = resolve_plan(plan, model)
    for warning in resolved.warnings:
        say(f"warning: {warning}")
    facts = arch_facts(model)
    facts.require("blocks", "streaming")
    block_names = [b for b, _ in blocks(model, facts)]
    all_names = list(model.state_dict(keep_vars=True))
    block_tensors = [[n for n in all_names if n.startswith(f"{b}.")] for b in block_names]
    in_block = {n for names in block_tensors for n in names}
    rows = [r for r in resolved.layers if r.kind != "attention"]
    outside_rows = [r for r in rows if not any(r.name.startswith(f"{b}.") for b in block_names)]
    outside_set = {r.name for r in outside_rows}
    block_rows = [r for r in rows if r.name not in outside_set]
    blocks_data = calib is not None and _rows_need_data(resolved, block_rows)
    outside_data = calib is not None and _rows_need_data(resolved, outside_rows)
    _check_outside(facts, outside_rows, resolved, blocks_data, outside_data)
    head_row = resolved.by_name().get(facts.lm_head) if facts.lm_head else None
    untie = bool(tied_aliases(model)) and head_row is not None and head_row.spec.weights is not None
    share = -(-samples // ranks)  # the largest rank's windows: every rank checks the same estimate
    need = estimate(model, resolved, block_names, tokens=(share, length) if blocks_data else None,
                    batch_size=batch_size, untie=untie)
    need.check(max_memory)
    say(f"streaming {len(block_names)} blocks from {folder}; estimated memory {need.describe()}")
    aliases = tied_aliases(model)
    outside_names = [n for n in all_names if n not in in_block and n not in
                     {a for group in aliases.values() for a in group}]
    fill(model, checkpoint.read(outside_names), aliases)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    tokens = None
    if calib is not None and needs_calibration(resolved):
        say(f"calibration: {samples} x {length} tokens from {calib}")
        tokens = calibration_tokens(tokenizer, calib, samples, length, seed)
    calib_s = time.perf_counter() - t1
    key = RunKey(str(folder.resolve()), plan_hash(resolved.plan), tokens_hash(tokens), len(block_names),
                 batch_size, ranks)
    stage = SharedStaging.open(comm, staging_folder(out), key, resume)
    resumed_after = stage.done
    if stage.done:
        say(f"resuming after {stage.done} of {len(block_names)} blocks from {stage.folder}")
    if tokens is not None and ranks > 1:
        start, stop = shard_range(tokens.shape[0], comm.rank, ranks)
        say(f"rank {comm.rank} of {ranks}: calibration windows {start}..{stop - 1}")
        tokens = tokens[start:stop]  # [stop - start, length]
    starts = range(0, tokens.shape[0], batch_size) if tokens is not None else range(0)
    batch_index = {tokens[i:i + batch_size].data_ptr(): k for k, i in enumerate(starts)}
    hooks = StreamHooks(model, checkpoint, stage, resolved, block_tensors, blocks_data=blocks_data,
                        outside_data=outside_data, batch_index=batch_index)
    run_hooks = DataParallelHooks(comm, inner=hooks) if ranks > 1 else hooks
    cpu0 = time.process_time()
    report = quantize_model(model, resolved, tokens, batch_size=batch_size, forward=hooks.forward,
                            progress=progress, hooks=run_hooks)
    cpu_s = time.process_time() - cpu0
    _merge_restored(report, hooks)
    distributed = None
    if isinstance(run_hooks, DataParallelHooks):
        mine = {"rank": comm.rank, "windows": None if tokens is None else int(tokens.shape[0]),
                "wall_s": report.seconds, "cpu_s": cpu_s, "peak_rss_mb": peak_rss_mb(),
                "reduce_s": run_hooks.seconds, "reduced_mb": run_hooks.bytes / 2**20}
        distributed = {"world_size": ranks, "backend": comm.backend, "ranks": comm.all_gather_object(mine)}
        if tokens is not None:
            report.calibration.update(samples=samples, shape=[samples, length])
    meta = {"model": model_name, "rotate": None, "rotate_seed": None, "report": report.to_json(),
            "streamed": {"blocks": len(block_names), "resumed_after": resumed_after,
                         "estimated_bytes": need.total, "max_memory": max_memory, "ranks": ranks}}

    def finish() -> Path:
        assert stage.stage is not None
        saved = write_run_folder(model, tokenizer, resolved, out, stage.stage, all_names, in_block,
                                 source=folder, meta=meta, scales=report.scales, overwrite=overwrite)
        stage.remove()
        return saved

    saved = on_main(comm, finish)  # the other ranks return once the run folder is complete
    return QuantizeOutcome(report=report, model=model, tokenizer=tokenizer,
                           out=saved if comm.is_main else None,
                           peak_rss_mb=peak_rss_mb(), load_seconds=load_s, calib_seconds=calib_s,
                           cpu_seconds=cpu_s, resolved=resolved, distributed=distributed)


def _rotate_online(model: nn.Module, resolved: ResolvedPlan, block_name: str) -> None:
    """Fold the online Hadamard of block ``block_name``'s layers into their freshly read weights
    (``W <- W M^T``), as :func:`~mixq.model.quantizers.install_quantizers` does for an in-memory model."""
    for row in resolved.layers:
        if row.kind == "attention" or not row.hadamard or not row.name.startswith(f"{block_name}."):
            continue
        module = inner(get_module(model, row.name))
        signs = hadamard_signs(row.shape[1], row.spec.options.hadamard_seed)
        set_weight_matrix(module, block_hadamard(weight_matrix(module), row.hadamard, signs))


def quantize_streamed_args(args: Any, plan: Plan, *, progress: Progress | None = None,
                           status: Callable[[str], None] | None = None) -> QuantizeOutcome:
    """:func:`quantize_streamed` with the options of ``mixq quantize`` (an argparse namespace)."""
    from mixq.stream_memory import parse_size

    if args.out is None:
        raise ValueError("expected --out with --stream, --max-memory or --resume (a streamed run writes its "
                         "blocks as it goes), found none")
    budget = parse_size(args.max_memory) if args.max_memory is not None else None
    return quantize_streamed(args.model, plan, out=args.out, max_memory=budget, resume=args.resume,
                             calib=args.calib, samples=args.samples, length=args.length,
                             batch_size=args.batch_size, rotate=args.rotate, overwrite=args.overwrite,
                             progress=progress, status=status)


def _check_outside(facts: Any, outside_rows: list[Any], resolved: ResolvedPlan, blocks_data: bool,
                   outside_data: bool) -> None:
    """Layers outside the blocks that need data: only an LM head after a final norm, fed by the blocks."""
    needing = [r.name for r in outside_rows if _rows_need_data(resolved, [r])]
    if not outside_data:
        return
    ok = needing == [facts.lm_head] and facts.final_norm is not None and blocks_data
    if not ok:
        raise PlanError(f"expected only an LM head after a final norm to need calibration data outside the "
                        f"blocks of a streamed run (and a block that needs data too), found {needing}; "
                        "keep these layers or quantize them with RTN, or use the in-memory path")


def _merge_restored(report: Any, hooks: StreamHooks) -> None:
    """Put the staged reports and scales of blocks an earlier (interrupted) run finished into ``report``."""
    if not hooks.restored_reports and not hooks.restored_scales:
        return
    for r in report.layers:
        saved = hooks.restored_reports.get(r.name)
        if saved is not None:
            for k, v in saved.items():
                if k != "bits_per_weight":
                    setattr(r, k, v)
    merged = {**hooks.restored_scales, **report.scales}
    order = [r.name for r in report.layers]
    report.scales.clear()
    report.scales.update({n: merged[n] for n in order if n in merged})
    report.scales.update({n: v for n, v in merged.items() if n not in report.scales})


def write_run_folder(model: nn.Module, tokenizer: Any, resolved: ResolvedPlan, out: Path, stage: Staging,
                     all_names: list[str], in_block: set[str], *, source: Path, meta: dict[str, Any],
                     scales: dict[str, Any], overwrite: bool) -> Path:
    """Assemble the run folder ``out`` (the layout of :func:`mixq.model.run_folder.save_quantized`, with
    the weights as one shard per block plus one for the rest and a ``model.safetensors.index.json``)."""
    from safetensors.torch import save_file

    from mixq.fileio import atomic_folder
    from mixq.model.run_folder import _save_scales

    check_target(out, source, overwrite)
    seen: set[int] = set()
    outside: dict[str, Tensor] = {}
    for name in all_names:
        if name in in_block:
            continue
        t = tensor_of(model, name)
        if id(t) not in seen and not t.is_meta:
            seen.add(id(t))
            outside[name] = t.detach().contiguous()
    ranges = {f"{name}.{part}.{key}": getattr(getattr(w, part), key).detach().clone().contiguous()
              for name, w in model.named_modules() if isinstance(w, QuantLinear)
              for part in ("inputs", "outputs")
              if isinstance(getattr(w, part), ActQuantizer) and getattr(w, part).static
              for key in ("lo", "hi")}
    with atomic_folder(out) as tmp:
        write_shards(tmp, stage, outside)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        resolved.plan.save(tmp / PLAN)
        if ranges:
            save_file(ranges, str(tmp / QUANTIZERS))
        _save_scales(scales, tmp / SCALES)
        info = {"mixq_version": mixq.__version__, "source": str(source), **meta}
        (tmp / META).write_text(json.dumps(info, indent=1, default=str) + "\n")
    return out
