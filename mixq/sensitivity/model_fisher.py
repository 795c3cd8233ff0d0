"""The per-token Fisher of the model's own output distribution: a predicted KL in nats per token.

For a causal LM the Fisher information of ``p(y | x; W)`` is the Hessian of ``KL(p_W0 || p_W)`` at the
fp32 weights, so ``0.5 * ΔWᵀ F ΔW`` predicts exactly the quantity ``kl`` measures. Labels are sampled
from the model's own next-token distribution (seeded), one per position, not taken from the text:
the empirical Fisher of real labels estimates the loss change instead, and overestimates KL by an
order of magnitude that differs from layer to layer.

For a linear layer the per-position gradient is ``g_t = δ_t x_tᵀ`` (``δ_t``: gradient of the summed
loss at the layer's output at position ``t``; ``x_t``: its input), so the diagonal of the per-position
Fisher is one matrix product, ``F = (1/N) Σ_t δ_t² x_t²ᵀ = (δ²)ᵀ (x²) / N`` (``[out, in]``), at the cost
of one weight gradient. Batch-mean gradients, squared (:func:`mixq.sensitivity.gradients.fisher_stats`),
let per-position gradients cancel and rank layers worse.

Encoders have no output distribution over tokens; the Gauss-Newton surrogate ``Σ ε ⊙ pooled(f(x))``
(``ε ~ N(0, 1)``, seeded) plays the sampled label, and ``N`` counts sentences.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixq.model.tree import input_matrix, weight_matrix
from mixq.sensitivity.gradients import grads_only_for
from mixq.sensitivity.outputs import model_forward, pooled

Progress = Callable[[str, int, int], None]


@contextmanager
def _taps(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[tuple[Tensor, Tensor]]]]:
    """Record ``(input, output)`` of every call of each module; hooks removed on exit."""
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {n: [] for n in modules}
    with ExitStack() as stack:
        for name, module in modules.items():
            def hook(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
                calls[name].append((args[0].detach(), out))

            stack.callback(module.register_forward_hook(hook).remove)
        yield calls


def _output_rows(module: nn.Module, d: Tensor) -> Tensor:
    """The output gradient ``d`` as fp64 rows ``[n, out]`` matching input_matrix's rows."""
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return d.movedim(1, -1).reshape(-1, d.shape[1]).double()  # [B*L, out]
    return d.reshape(-1, d.shape[-1]).double()


def _sampled_loss(model: nn.Module, batch: dict[str, Tensor], kind: str, generator: torch.Generator) -> tuple[Tensor, int]:
    """(summed loss with sampled labels, number of samples N) for one batch."""
    out = model_forward(model, batch, kind)
    if kind == "lm":
        logits = out.float()  # [B, T, V]
        with torch.no_grad():
            probs = logits.detach().softmax(-1).reshape(-1, logits.shape[-1]).cpu()  # [B*T, V]
            labels = torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:2])  # [B, T]
        mask = batch.get("attention_mask")
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                              reduction="none")  # [B*T]
        if mask is not None:
            keep = mask.reshape(-1).to(nll.dtype)
            return (nll * keep).sum(), int(keep.sum())
        return nll.sum(), int(nll.numel())
    e = pooled(out, batch["attention_mask"])  # [B, D]
    eps = torch.randn(e.shape, generator=generator).to(e.device)  # [B, D]
    return (eps * e).sum(), int(e.shape[0])


def model_fisher(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[dict[str, Tensor]], *,
                 kind: str = "lm", seed: int = 0, progress: Progress | None = None) -> dict[str, Tensor]:
    """``F[name]`` fp32 ``[out, in]`` (weight_matrix layout): the per-sample diagonal Fisher of each layer.

    ``batches``: dicts of ``[B, T]`` tensors (``input_ids``; ``attention_mask`` for encoders). One forward and
    one backward (to the layer outputs only) per batch. Grouped convs have no row form of their input and are
    left out of the result (the caller notes them).
    """
    names = [n for n, m in modules.items() if getattr(m, "groups", 1) == 1]
    weights = [modules[n].weight for n in names]
    Fs = {n: torch.zeros(weight_matrix(modules[n]).shape, dtype=torch.float64) for n in names}
    generator = torch.Generator().manual_seed(seed)
    report = progress or (lambda stage, done, total: None)
    count = 0
    with grads_only_for(model, weights), torch.enable_grad():
        for b, batch in enumerate(batches):
            report("fisher_model", b, len(batches))
            with _taps({n: modules[n] for n in names}) as calls:
                loss, n_samples = _sampled_loss(model, batch, kind, generator)
            flat = [(n, x, y) for n in names for x, y in calls[n]]
            grads = torch.autograd.grad(loss, [y for _, _, y in flat], allow_unused=True)
            for (n, x, _), d in zip(flat, grads):
                if d is None:
                    continue
                X2 = input_matrix(modules[n], x).double() ** 2  # [rows, in]
                D2 = _output_rows(modules[n], d) ** 2  # [rows, out]
                Fs[n] += (D2.T @ X2).cpu()  # [out, in]
            count += n_samples
            del loss, grads, flat
    report("fisher_model", len(batches), len(batches))
    return {n: (f / max(count, 1)).float() for n, f in Fs.items()}

