"""End-to-end functions behind ``mixq quantize`` and ``mixq eval``: load, calibrate, quantize, save, measure.

Each is one call with explicit inputs and a result object; the command line only parses arguments
and prints. Language models use the wiki-smollm2 protocol of ../shared/BENCHMARKS.md by default
(64 calibration windows of 512 tokens drawn with seed 0; 32 test windows of 512 tokens).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq.algorithms.runner import Progress, QuantizeReport, needs_calibration, quantize_model
from mixq.dist.comm import Comm
from mixq.model.load import load_model, resolve
from mixq.model.plan_match import resolve as resolve_plan
from mixq.model.run_folder import check_target, is_run_folder, load_quantized, save_quantized
from mixq.plan import Plan


@dataclass
class QuantizeOutcome:
    """What :func:`quantize` produced: the report, the in-memory model and where it was saved."""

    report: QuantizeReport
    model: nn.Module
    tokenizer: Any
    out: Path | None
    peak_rss_mb: float
    load_seconds: float
    calib_seconds: float
    cpu_seconds: float = 0.0
    resolved: ResolvedPlan | None = None  # the plan as matched against the model before wrapping
    distributed: dict[str, Any] | None = None  # world size, backend and each rank's figures (torchrun)

    def to_json(self) -> dict[str, Any]:
        extra = {"distributed": self.distributed} if self.distributed else {}
        return {"out": str(self.out) if self.out else None, "wall_s": self.report.seconds,
                "cpu_s": self.cpu_seconds,
                "peak_rss_mb": self.peak_rss_mb, "load_s": self.load_seconds,
                "calib_tokenize_s": self.calib_seconds, **self.report.to_json(), **extra}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_tokenizer(model_or_dir: str | os.PathLike[str]) -> Any:
    """The tokenizer stored with a model (named asset, Hugging Face folder or run folder), or None."""
    from transformers import AutoTokenizer

    folder = resolve(model_or_dir)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        return None


def token_source(source: str | os.PathLike[str], tokenizer: Any,
                 length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pool, test)`` token splits of ``source``; a token file needs no tokenizer, text does."""
    from mixq.eval.corpus import TOKEN_SUFFIXES, load_token_source

    if tokenizer is None and Path(str(source)).suffix.lower() not in TOKEN_SUFFIXES:
        raise ValueError(f"expected a token file ({', '.join(TOKEN_SUFFIXES)}) as data source, found "
                         f"{str(source)!r}: the model folder has no tokenizer to turn text into tokens")
    return load_token_source(source, tokenizer, length=length)


def calibration_tokens(tokenizer: Any, source: str, samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """``[samples, length]`` calibration token windows from ``source`` (``wiki`` or a file).

    ``tokenizer`` may be None when ``source`` is a token file (``.pt``/``.npy``/``.json``).
    """
    from mixq.eval.corpus import calibration_windows

    pool, _ = token_source(source, tokenizer, length)
    return calibration_windows(pool, samples, length, seed)


def quantize(model_name: str, plan: Plan, *, calib: str | None = "wiki", samples: int = 64, length: int = 512,
             seed: int = 0, batch_size: int = 8, rotate: str | None = None, rotate_seed: int | None = None,
             out: str | os.PathLike[str] | None = None, overwrite: bool = False,
             progress: Progress | None = None, status: Callable[[str], None] | None = None) -> QuantizeOutcome:
    """Load ``model_name``, check ``plan`` against it, calibrate, quantize and (if ``out``) save a run folder.

    The plan is resolved before the calibration data is read, so every plan error comes first.
    ``wall_s`` in the result covers the quantization step only (not loading or tokenizing).

    Started by torchrun (``WORLD_SIZE`` > 1), every rank calibrates on its contiguous share of the
    windows and the statistics are combined (:mod:`mixq.dist`); only rank 0 saves the run folder.
    """
    from mixq.dist.comm import process_group_from_env

    with process_group_from_env() as comm:
        return _quantize(model_name, plan, comm, calib=calib, samples=samples, length=length, seed=seed,
                         batch_size=batch_size, rotate=rotate, rotate_seed=rotate_seed, out=out,
                         overwrite=overwrite, progress=progress, status=status)


def _quantize(model_name: str, plan: Plan, comm: Comm, *, calib: str | None, samples: int, length: int,
              seed: int, batch_size: int, rotate: str | None, rotate_seed: int | None,
              out: str | os.PathLike[str] | None, overwrite: bool, progress: Progress | None,
              status: Callable[[str], None] | None) -> QuantizeOutcome:
    from mixq.dist.comm import shard_range
    from mixq.dist.reduce import DataParallelHooks

    if comm.world_size > 1 and calib is not None and samples < comm.world_size:
        raise ValueError(f"expected at least one calibration window per rank, found {samples} windows "
                               f"for {comm.world_size} ranks: raise --samples or start fewer processes")
    say = status or (lambda _m: None)
    t0 = time.perf_counter()
    model = load_model(model_name, status=say)
    tokenizer = load_tokenizer(model_name)
    load_s = time.perf_counter() - t0
    resolved = resolve_plan(plan, model)
    for warning in resolved.warnings:
        say(f"warning: {warning}")
    if out is not None:
        check_target(Path(out), resolve(model_name), overwrite)
    t1 = time.perf_counter()
    tokens = None
    if calib is not None and needs_calibration(resolved):  # token files need no tokenizer
        say(f"calibration: {samples} x {length} tokens from {calib}")
        tokens = calibration_tokens(tokenizer, calib, samples, length, seed)
    calib_s = time.perf_counter() - t1
    hooks = None
    if comm.world_size > 1:
        hooks = DataParallelHooks(comm)
        if tokens is not None:
            start, stop = shard_range(tokens.shape[0], comm.rank, comm.world_size)
            say(f"rank {comm.rank} of {comm.world_size}: calibration windows {start}..{stop - 1}")
            tokens = tokens[start:stop]  # [stop - start, length]
    cpu0 = time.process_time()
    report = quantize_model(model, resolved, tokens, batch_size=batch_size, rotate=rotate,
                            rotate_seed=rotate_seed, progress=progress, hooks=hooks)
    cpu_s = time.process_time() - cpu0
    distributed = None
    if comm.world_size > 1:
        assert hooks is not None
        mine = {"rank": comm.rank, "windows": None if tokens is None else int(tokens.shape[0]),
                "wall_s": report.seconds, "cpu_s": cpu_s, "peak_rss_mb": peak_rss_mb(),
                "reduce_s": hooks.seconds, "reduced_mb": hooks.bytes / 2**20}
        ranks = comm.all_gather_object(mine)
        distributed = {"world_size": comm.world_size, "backend": comm.backend, "ranks": ranks}
        if tokens is not None:
            report.calibration.update(samples=samples, shape=[samples, length])
    saved = None
    if out is not None and comm.is_main:
        meta = {"model": model_name, "rotate": rotate, "rotate_seed": rotate_seed,
                "report": report.to_json()}
        saved = save_quantized(model, tokenizer, resolved, out, source=resolve(model_name), meta=meta,
                               overwrite=overwrite, scales=report.scales)
    return QuantizeOutcome(report, model, tokenizer, saved, peak_rss_mb(), load_s, calib_s, cpu_s, resolved,
                           distributed)


@dataclass
class Evaluation:
    """Metrics of one model on one text source (fields that do not apply are None)."""

    model: str
    data: str
    ppl: float | None = None
    nll: float | None = None
    tokens: int = 0
    kl: float | None = None
    top1: float | None = None
    kl_tokens: int = 0
    reference: str | None = None
    cosine: float | None = None
    rel_mse: float | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def open_model(model_or_dir: str | os.PathLike[str]) -> tuple[nn.Module, str | None]:
    """A model by name/folder, a run folder with its quantizers, or an exported folder (mixq or
    compressed-tensors, read back to its fake-quant model); also the source model's name if recorded."""
    from mixq.export.compressed import is_compressed_tensors_folder
    from mixq.export.mixq_format import is_mixq_folder

    if is_mixq_folder(model_or_dir) or is_compressed_tensors_folder(model_or_dir):
        from mixq.export.load import read

        exported = read(model_or_dir)
        meta = exported.meta.get("meta", exported.meta)  # the manifest nests the run's metadata
        return exported.model, meta.get("model")
    if is_run_folder(model_or_dir):
        model, meta = load_quantized(model_or_dir)
        return model, meta.get("model")
    return load_model(model_or_dir), None


def is_encoder(model: nn.Module) -> bool:
    return not hasattr(model, "lm_head") and not type(model).__name__.endswith("ForCausalLM")


def evaluate(model_or_dir: str | os.PathLike[str], *, data: str = "wiki", windows: int = 32, length: int = 512,
             reference: str | None = None, compare: bool = True, agreement_windows: int | None = None,
             model: nn.Module | None = None, progress: Callable[[int, int], None] | None = None) -> Evaluation:
    """Perplexity (causal LMs) and agreement with a reference model on ``data``.

    For a run folder the reference defaults to its source model; ``compare=False`` skips it. KL and
    top-1 agreement use the first ``agreement_windows`` test windows (all when None). For an
    encoder (e.g. MiniLM) the metric is the cosine similarity of mean-pooled sentence embeddings with
    the reference, on ``windows`` x 16 wiki sentences.
    """
    from mixq.eval.corpus import eval_windows
    from mixq.eval.lm_metrics import embedding_agreement, encoder_batches, score

    t0 = time.perf_counter()
    source = None
    if model is None:
        model, source = open_model(model_or_dir)
    model.eval()
    tokenizer = load_tokenizer(model_or_dir)
    ref_name = reference or (source if compare else None)
    ref = load_model(ref_name) if ref_name else None
    result = Evaluation(model=str(model_or_dir), data=data, reference=ref_name)
    if is_encoder(model):
        from mixq.eval.corpus import wiki_sentences

        if ref is None:
            raise ValueError("an encoder is evaluated against a reference model: pass --reference MODEL")
        batches = encoder_batches(tokenizer, wiki_sentences(windows * 16, seed=0))
        agreement = embedding_agreement(model, ref, batches)
        result.cosine, result.rel_mse, result.tokens = agreement.cosine, agreement.rel_mse, agreement.n
    else:
        _, test = token_source(data, tokenizer, length)
        win = eval_windows(test, windows, length)
        ppl, agreement = score(model, win, ref, agreement_windows=agreement_windows, progress=progress)
        result.ppl, result.nll, result.tokens = ppl.ppl, ppl.nll, ppl.tokens
        if agreement is not None:
            result.kl, result.top1, result.kl_tokens = agreement.kl, agreement.top1, agreement.tokens
    result.seconds = time.perf_counter() - t0
    return result
