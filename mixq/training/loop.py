"""One training run: a task, a low-precision recipe (or QAT), an optimizer, a number of steps.

``train(task, recipe, optimizer, steps, seed)``:

1. ``model = task.build_model(seed)``; with ``qat`` (a weight spec such as ``"int4:g32"``) the model is
   prepared by :func:`mixq.training.qat.prepare_qat` with ``Plan.uniform`` (the task's ``keep`` layers
   stay in full precision) and trained in fp32 otherwise; without it the recipe's emulated GEMMs are
   swapped in by :func:`mixq.model.emulate_swap.emulate` (``fp32``: nothing is swapped).
2. The optimizer: ``adam`` / ``sgd`` are the plain torch optimizers on fp32 weights (master-weight
   baseline; ``sgd`` with momentum 0.9); ``eco``, ``sr``, ``naive``, ``master`` are those of
   :mod:`mixq.training.optim` (``rule`` ``adam`` by default) with the weight grid ``weight_format``
   (default: the recipe's forward weight format) on the weights of the quantized layers; weights
   whose shape the grid does not fit, biases, norms and embeddings are updated in full precision
   (listed in ``notes``). Those weights start on the grid (projected once before the first step).
3. ``steps`` steps: batch from a ``torch.Generator`` seeded with ``seed``, loss, backward, step;
   the loss and wall time of each step are recorded; the task's metric is evaluated every
   ``eval_every`` steps (0: only at the end).
4. With ``qat`` and ``ptq_baseline``: the same model trained in fp32 with the same seed, optimizer and
   steps, then quantized with the same spec by round to nearest (prepare_qat without learned scales,
   then convert: what the PTQ path gives) and evaluated, for comparison.

QAT starts from the seed's random init (``qat_init="scratch"``) or fine-tunes (``qat_init="fp32"``):
the model is first trained in fp32 for ``pretrain_steps`` steps (that model and its PTQ are the
baseline, so nothing is trained twice), then prepared for QAT (learned steps initialized by the spec's
scale rule on the trained weights) and trained ``steps`` more steps on a fresh batch order
(generator seed ``seed + FINETUNE_SEED_OFFSET``). Since QAT then trains longer than the fp32 model,
the baseline also reports ``fp32_continued``: a copy of the fp32 model trained the same ``steps`` more
steps, same optimizer, rate and batches, in fp32 (the fair ceiling for the QAT model).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mixq.model.emulate_swap import emulate
from mixq.plan.plan import pattern_matches
from mixq.quant import QuantSpec
from mixq.training.emulated import is_identity
from mixq.training.optim import grid_quantize
from mixq.training.recipes import Override, recipe as get_recipe
from mixq.training.tasks import Task

OPTIMIZERS = ("adam", "sgd", "eco", "sr", "naive", "master")
QAT_INITS = ("scratch", "fp32")
SCALINGS = ("current", "delayed", "predicted")
PREDICT_REFRESH = 16  # predicted weight scaling: exact amax every 16 calls
FINETUNE_SEED_OFFSET = 1_000_003
Progress = Callable[[int, int, float], None]


@dataclass
class TrainResult:
    """What a run measured. ``losses[i]``, ``step_seconds[i]``: training loss and wall time of step
    ``i``; ``evals``: ``(step, metrics)`` pairs (step = steps done); ``metrics``: the final evaluation;
    ``ptq``: with QAT, the fp32-trained model's metrics before (``fp32``) and after (``ptq``)
    quantization, and ``fp32_continued`` when QAT fine-tuned it (see the module docstring);
    ``optimizer_state_bytes``: bytes of the optimizer's state tensors."""

    task: str
    recipe: str
    optimizer: str
    steps: int
    seed: int
    lr: float
    metric: str
    metrics: dict[str, float]
    losses: list[float]
    step_seconds: list[float]
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    weight_format: str | None = None
    qat: str | None = None
    ptq: dict[str, dict[str, float]] | None = None
    emulated_layers: dict[str, str] = field(default_factory=dict)
    optimizer_state_bytes: int = 0
    parameters: int = 0
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    qat_init: str | None = None
    pretrain_steps: int = 0
    scaling: str = "current"

    @property
    def final(self) -> float:
        """The task's metric at the end of training."""
        return self.metrics[self.metric]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["evals"] = [{"step": s, **m} for s, m in self.evals]
        d["final_train_loss"] = _tail_mean(self.losses)
        d["median_step_seconds"] = _median(self.step_seconds)
        return d


def _tail_mean(xs: Sequence[float], frac: float = 0.1) -> float | None:
    if not xs:
        return None
    tail = xs[-max(1, int(len(xs) * frac)):]
    return sum(tail) / len(tail)


def _median(xs: Sequence[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def _kept(name: str, keep: Sequence[str]) -> bool:
    return any(pattern_matches(p, name) for p in keep)


def _grid_params(model: nn.Module, spec: QuantSpec,
                 keep: Sequence[str]) -> tuple[list[nn.Parameter], list[str]]:
    """Weights of linear/conv layers (plain or emulated) outside ``keep`` that ``spec`` can quantize
    (conv weights in their matrix view ``[out, in*kh*kw]``)."""
    chosen: list[nn.Parameter] = []
    notes: list[str] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if (not isinstance(w, nn.Parameter) or w.dim() < 2 or id(w) in seen
                or isinstance(module, nn.Embedding)):
            continue
        if _kept(name, keep):
            seen.add(id(w))
            continue
        seen.add(id(w))
        try:
            grid_quantize(w.detach(), spec)
        except ValueError as err:
            reason = " ".join(str(err).split())
            notes.append(f"{name}.weight {tuple(w.shape)} kept off the {spec} grid: {reason}")
            continue
        chosen.append(w)
    return chosen, notes


def make_optimizer(model: nn.Module, name: str, lr: float, *, weight_format: QuantSpec | str | None = None,
                   keep: Sequence[str] = (), rule: str = "adam", seed: int = 0
                   ) -> tuple[torch.optim.Optimizer, list[str]]:
    """The optimizer ``name`` (:data:`OPTIMIZERS`) over ``model``'s parameters; returns it and notes.

    Grid optimizers put the weights :func:`_grid_params` picks on ``weight_format`` (projected onto it
    now) and every other parameter in a group with ``spec=None``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr), []
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9), []
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; optimizers: {', '.join(OPTIMIZERS)}")
    from mixq.training import optim

    if weight_format is None:
        raise ValueError(f"optimizer {name!r} keeps weights on a grid: give a weight format "
                         f"(--weight-format) "
                         f"or a recipe that quantizes weights")
    spec = weight_format if isinstance(weight_format, QuantSpec) else QuantSpec.parse(weight_format)
    on_grid, notes = _grid_params(model, spec, keep)
    grid_ids = {id(p) for p in on_grid}
    rest = [p for p in params if id(p) not in grid_ids]
    with torch.no_grad():
        for p in on_grid:
            p.copy_(grid_quantize(p, spec))
    kind = {"eco": optim.ECO, "sr": optim.SRUpdate, "naive": optim.NaiveQuantized,
            "master": optim.MasterWeights}[name]
    groups = [{"params": on_grid, "spec": spec}] + ([{"params": rest, "spec": None}] if rest else [])
    return kind(groups, lr=lr, spec=None, rule=rule, seed=seed), notes


def _recipe_weight_format(recipe_name: str) -> QuantSpec | None:
    w = get_recipe(recipe_name).weight
    return None if is_identity(w) else w


def _loop(task: Task, model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int, eval_every: int,
          progress: Progress | None) -> tuple[list[float], list[float], list[tuple[int, dict[str, float]]]]:
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    times: list[float] = []
    evals: list[tuple[int, dict[str, float]]] = []
    model.train()
    for step in range(steps):
        t0 = time.perf_counter()
        batch = task.batch(gen)
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        times.append(time.perf_counter() - t0)
        losses.append(value)
        if not math.isfinite(value):
            break
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.eval()
            evals.append((step + 1, task.evaluate(model)))
            model.train()
        if progress is not None:
            progress(step + 1, steps, value)
    model.eval()
    evals.append((len(losses), task.evaluate(model)))
    return losses, times, evals


def _qat_plan(spec: QuantSpec, keep: Sequence[str]) -> Any:
    from mixq.plan import LayerSpec, Plan

    return Plan.uniform(LayerSpec(weights=spec), keep=tuple(keep))


def train(task: Task, recipe: str = "fp32", optimizer: str = "adam", steps: int = 100, seed: int = 0, *,
          lr: float | None = None, weight_format: QuantSpec | str | None = None, rule: str = "adam",
          qat: QuantSpec | str | None = None, ptq_baseline: bool = True, keep: Sequence[str] | None = None,
          overrides: Sequence[Override] = (), eval_every: int = 0, qat_init: str = "scratch",
          pretrain_steps: int | None = None, pretrain_lr: float | None = None, scaling: str = "current",
          progress: Progress | None = None) -> TrainResult:
    """Train ``task``'s model for ``steps`` steps (see the module docstring); returns a :class:`TrainResult`.

    ``lr``: default ``task.lr`` for the optimizer's rule (``sgd`` for ``sgd``, else ``rule``).
    ``keep``: layer patterns kept in full precision (default ``task.keep``), prepended to ``overrides``
    as ``(pattern, None)``. ``progress(step, steps, loss)`` is called after each step.
    ``qat_init``: ``scratch`` | ``fp32`` (fine-tune a model trained ``pretrain_steps`` steps, default
    ``steps``, in fp32 at ``pretrain_lr``, default the task's; ``lr`` is then the fine-tuning rate).
    ``scaling`` of the recipe's per-tensor operands: ``current`` (each tensor's own amax), ``delayed``
    (amax history of 16 steps) or ``predicted`` (MOSS-style: weights scaled by the amax predicted from
    the update bound ``lr``, exact every 16 calls; other operands current); block formats keep
    their per-block scales.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; optimizers: {', '.join(OPTIMIZERS)}")
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; expected one of {', '.join(SCALINGS)}")
    if qat_init not in QAT_INITS:
        raise ValueError(f"unknown qat_init {qat_init!r}; expected one of {', '.join(QAT_INITS)}")
    if qat_init != "scratch" and qat is None:
        raise ValueError(f"qat_init={qat_init!r} fine-tunes a QAT model: give a qat spec too")
    formats = get_recipe(recipe)  # unknown recipe -> KeyError listing them
    keep = tuple(task.keep if keep is None else keep)
    family = "sgd" if optimizer == "sgd" else rule
    lr = task.lr[family] if lr is None else lr
    model = task.build_model(seed)
    notes: list[str] = []
    swapped: dict[str, str] = {}
    qat_spec = None
    baseline = None
    pre_steps = 0
    if qat is not None and qat_init == "fp32":
        pre_steps = steps if pretrain_steps is None else pretrain_steps
        pre_lr = task.lr[family] if pretrain_lr is None else pretrain_lr
        spec = qat if isinstance(qat, QuantSpec) else QuantSpec.parse(qat)
        model, baseline = _pretrained(task, optimizer, pre_steps, seed, spec, keep=keep, lr=pre_lr, rule=rule,
                                      progress=progress)
        if ptq_baseline and optimizer in ("adam", "sgd"):
            float_model = copy.deepcopy(model)
            float_opt, _ = make_optimizer(float_model, optimizer, lr, keep=keep, rule=rule, seed=seed)
            baseline["fp32_continued"] = _loop(task, float_model, float_opt, steps, seed + FINETUNE_SEED_OFFSET,
                                               0, None)[2][-1][1]
            del float_model, float_opt
    if qat is not None:
        from mixq.training.qat import prepare_qat

        if recipe != "fp32":
            raise ValueError(f"QAT trains fake-quantized weights in fp32: use recipe 'fp32' with --qat, "
                             f"got {recipe!r}")
        qat_spec = qat if isinstance(qat, QuantSpec) else QuantSpec.parse(qat)
        prepare_qat(model, _qat_plan(qat_spec, keep))
    else:
        from mixq.training.scaling import DelayedScaling, PredictedScaling

        chosen = emulate(model, formats, [(p, None) for p in keep] + list(overrides), seed=seed,
                         delayed=DelayedScaling() if scaling == "delayed" else None,
                         predicted=PredictedScaling(lr, PREDICT_REFRESH) if scaling == "predicted" else None)
        swapped = {name: f.describe() for name, f in chosen.items()}
    wf = weight_format if weight_format is not None else (_recipe_weight_format(recipe) or qat_spec)
    opt, opt_notes = make_optimizer(model, optimizer, lr, weight_format=wf if optimizer not in ("adam", "sgd")
                                    else None, keep=keep, rule=rule, seed=seed)
    notes += opt_notes
    data_seed = seed + FINETUNE_SEED_OFFSET if pre_steps else seed
    losses, times, evals = _loop(task, model, opt, steps, data_seed, eval_every, progress)
    if len(losses) < steps:
        notes.append(f"stopped at step {len(losses)}: the loss is not finite")
    from mixq.training.optim import state_bytes

    result = TrainResult(task.name, recipe, optimizer, steps, seed, lr, task.metric, evals[-1][1], losses,
                         times,
                         evals, None if wf is None or optimizer in ("adam", "sgd") else str(wf),
                         None if qat_spec is None else str(qat_spec), None, swapped, state_bytes(opt),
                         sum(p.numel() for p in model.parameters()), notes, dict(task.info))
    result.qat_init = None if qat_spec is None else qat_init
    result.scaling = scaling
    result.pretrain_steps = pre_steps
    if baseline is not None:
        result.ptq = baseline
    elif qat_spec is not None and ptq_baseline:
        result.ptq = ptq_baseline_metrics(task, optimizer, steps, seed, qat_spec, keep=keep, lr=lr, rule=rule,
                                          weight_format=wf)
    return result


def _pretrained(task: Task, optimizer: str, steps: int, seed: int, spec: QuantSpec, *, keep: Sequence[str],
                lr: float, rule: str = "adam", weight_format: QuantSpec | str | None = None,
                progress: Progress | None = None) -> tuple[nn.Module, dict[str, dict[str, float]]]:
    """The task's model trained in fp32 (seeded) and ``{"fp32": metrics, "ptq": metrics}``, the PTQ
    being round to nearest on ``spec`` of a copy (the returned model keeps its float weights)."""
    from mixq.training.qat import convert, prepare_qat

    model = task.build_model(seed)
    grid = weight_format if optimizer not in ("adam", "sgd") else None
    opt, _ = make_optimizer(model, optimizer, lr, weight_format=grid, keep=keep, rule=rule, seed=seed)
    _, _, evals = _loop(task, model, opt, steps, seed, 0, progress)
    quantized = convert(prepare_qat(copy.deepcopy(model), _qat_plan(spec, keep), learn_scales=False))
    quantized.eval()
    return model, {"fp32": evals[-1][1], "ptq": task.evaluate(quantized)}


def ptq_baseline_metrics(task: Task, optimizer: str, steps: int, seed: int, spec: QuantSpec, *,
                         keep: Sequence[str], lr: float, rule: str = "adam",
                         weight_format: QuantSpec | str | None = None) -> dict[str, dict[str, float]]:
    """Train the task's model in fp32 (same seed, optimizer, steps), then quantize its weights with
    ``spec`` by round to nearest; returns ``{"fp32": metrics, "ptq": metrics}``."""
    return _pretrained(task, optimizer, steps, seed, spec, keep=keep, lr=lr, rule=rule,
                       weight_format=weight_format)[1]


__all__ = ["OPTIMIZERS", "QAT_INITS", "SCALINGS", "TrainResult", "make_optimizer", "ptq_baseline_metrics", "train"]
