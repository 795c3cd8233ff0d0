"""Second-order statistics of the profiled weights: empirical Fisher and Hutchinson Hessian traces.

Both differentiate a scalar loss ``loss_fn(model, batch, index)`` (built by the caller: next-token
cross-entropy for an LM, a Gauss-Newton surrogate for an encoder) with ``requires_grad`` switched on
for the profiled weights only (every flag is restored afterwards).

- :func:`fisher_stats`: one backward per batch; ``F = mean_b (dL_b/dW)^2`` per layer (fp32, ``[out, in]``
  like :func:`mixq.model.tree.weight_matrix`), and for layers whose candidates quantize inputs the
  first-order input term ``0.5 * sum (dL/dx)^2 ⊙ (x - Q(x))^2`` averaged over batches.
- :func:`hutchinson_traces` / :func:`hessian_traces`: HAWQ-V2 trace estimates. One Hessian-vector
  product per Rademacher sample ``v`` over all profiled weights at once gives every layer's estimate
  ``sum v_l ⊙ (Hv)_l`` (unbiased for ``tr(H_ll)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from mixq.model.swap import quantize_input
from mixq.model.tree import is_hf_conv1d
from mixq.quant import QuantSpec

LossFn = Callable[[nn.Module, dict[str, Tensor], int], Tensor]
Progress = Callable[[str, int, int], None]


@contextmanager
def grads_only_for(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """``requires_grad`` True on ``params`` only, inside the block; every parameter's flag restored on exit."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def as_matrix(module: nn.Module, g: Tensor) -> Tensor:
    """A tensor laid out like ``module.weight`` as fp32 ``[out, in_flat]`` (the weight_matrix layout)."""
    if is_hf_conv1d(module):
        return g.detach().t().float()
    return g.detach().reshape(g.shape[0], -1).float()


@contextmanager
def input_taps(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[Tensor]]]:
    """Give each module's first input its own autograd node and record it (name -> inputs of each call).

    The recorded tensor is what the module consumes, so the gradient with respect to it is the
    gradient through that module alone (q/k/v that share one input get separate gradients). An input
    that does not require grad becomes a fresh leaf that does.
    """
    taps: dict[str, list[Tensor]] = {name: [] for name in modules}
    with ExitStack() as stack:
        for name, module in modules.items():
            def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any], name: str = name) -> Any:
                if not args or not isinstance(args[0], Tensor):
                    return None
                x = args[0]
                x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
                taps[name].append(x)
                return (x,) + tuple(args[1:]), kwargs

            stack.callback(module.register_forward_pre_hook(hook, with_kwargs=True).remove)
        yield taps


def fisher_stats(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[dict[str, Tensor]],
                 loss_fn: LossFn, input_specs: dict[str, list[QuantSpec]] | None = None,
                 progress: Progress | None = None) -> tuple[dict[str, Tensor], dict[str, list[float]]]:
    """Empirical Fisher diagonal per layer and the input-quantization terms.

    Returns ``(F, x_terms)``: ``F[name]`` ``[out, in]`` fp32 = mean over batches of the squared gradient;
    ``x_terms[name][k]`` = mean over batches of ``0.5 * sum (dL/dx)^2 (x - Q_k(x))^2`` for the k-th spec
    of ``input_specs[name]`` (fp64 sums).
    """
    input_specs = {n: s for n, s in (input_specs or {}).items() if s}
    names = list(modules)
    weights = [modules[n].weight for n in names]
    F = {n: torch.zeros(as_matrix(modules[n], modules[n].weight).shape, dtype=torch.float32,
                        device=weights[i].device) for i, n in enumerate(names)}
    x_terms = {n: [0.0] * len(specs) for n, specs in input_specs.items()}
    report = progress or (lambda stage, done, total: None)
    tapped = {n: modules[n] for n in input_specs}
    with grads_only_for(model, weights), torch.enable_grad():
        for b, batch in enumerate(batches):
            report("fisher", b, len(batches))
            with input_taps(tapped) as taps:
                loss = loss_fn(model, batch, b)
            xs = [(n, x) for n in tapped for x in taps[n]]
            grads = torch.autograd.grad(loss, weights + [x for _, x in xs], allow_unused=True)
            for n, g in zip(names, grads[:len(names)]):
                if g is not None:
                    F[n] += as_matrix(modules[n], g) ** 2
            for (n, x), gx in zip(xs, grads[len(names):]):
                if gx is None:
                    continue
                g2 = gx.detach().double() ** 2
                xd = x.detach()
                for k, spec in enumerate(input_specs[n]):
                    err = (xd - quantize_input(xd, spec)).double() ** 2
                    x_terms[n][k] += 0.5 * float((g2 * err).sum())
            del loss, grads, xs
    report("fisher", len(batches), len(batches))
    n_b = max(len(batches), 1)
    for n in names:
        F[n] /= n_b
    return F, {n: [v / n_b for v in vals] for n, vals in x_terms.items()}


def rademacher_like(p: Tensor, generator: torch.Generator) -> Tensor:
    """±1 of ``p``'s shape and dtype, drawn on the CPU from ``generator`` (device-independent), moved to ``p``."""
    v = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8) * 2 - 1
    return v.to(device=p.device, dtype=p.dtype)


def hutchinson_traces(loss: Tensor, params: Sequence[Tensor], samples: int,
                      generator: torch.Generator) -> list[float]:
    """Per-parameter Hutchinson estimates of ``tr(H_pp)`` for the Hessian of ``loss`` (a scalar built
    with grad enabled on ``params``), averaged over ``samples`` Rademacher vectors; one HVP each."""
    if samples < 1:
        raise ValueError(f"expected hutchinson samples >= 1, found {samples}")
    g = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    live = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
    out = [0.0] * len(params)
    if not live:
        return out
    for s in range(samples):
        vs = [rademacher_like(p, generator) for p in params]
        gv = sum((g[i] * vs[i]).sum() for i in live)
        Hv = torch.autograd.grad(gv, [params[i] for i in live], retain_graph=s + 1 < samples, allow_unused=True)
        for i, h in zip(live, Hv):
            if h is not None:
                out[i] += float((vs[i].double() * h.detach().double()).sum())
    return [v / samples for v in out]


def hessian_traces(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[dict[str, Tensor]],
                   loss_fn: LossFn, samples: int = 4, seed: int = 0,
                   progress: Progress | None = None) -> dict[str, float]:
    """``tr(H_l)`` per layer (Hutchinson, ``samples`` per batch, averaged over batches); seeded."""
    names = list(modules)
    weights = [modules[n].weight for n in names]
    generator = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(names)
    report = progress or (lambda stage, done, total: None)
    with grads_only_for(model, weights), torch.enable_grad(), _math_attention():
        for b, batch in enumerate(batches):
            report("hessian", b, len(batches))
            loss = loss_fn(model, batch, b)
            for i, t in enumerate(hutchinson_traces(loss, weights, samples, generator)):
                totals[i] += t
            del loss
    report("hessian", len(batches), len(batches))
    return {n: totals[i] / max(len(batches), 1) for i, n in enumerate(names)}


@contextmanager
def _math_attention() -> Iterator[None]:
    """Scaled-dot-product attention on its math backend (fused kernels have no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield
