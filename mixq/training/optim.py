"""Optimizers for weights that live on a quantization grid, with and without an fp32 master copy.

Every optimizer here takes per parameter group a ``spec`` (a :class:`~mixq.quant.QuantSpec` or its
string form, e.g. ``"int4n:g32:e8m0"``, ``"mxfp4"``, ``"fp8_e4m3"``; ``None`` = full precision) and
keeps the model's parameters equal to ``fake_quantize(., spec)`` of something after every step. The
grid's scales are chosen by the spec's scale rule from the tensor being quantized (current scaling).

The update direction ``u`` is shared (gradient ``g`` plus ``weight_decay * w`` as an L2 term):

* ``rule="sgd"``: heavy-ball momentum as :class:`torch.optim.SGD` (``m = beta m + g``, ``u = m``;
  ``momentum=0`` gives ``u = g`` and keeps no state);
* ``rule="adam"``: ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, ``u = m_hat / (sqrt(v_hat) + eps)``
  with the usual bias corrections (as :class:`torch.optim.Adam`).

The four optimizers differ only in where ``w - lr u`` is kept:

* :class:`NaiveQuantized` (control): ``w = Q_rne(w - lr u)``; updates below half a grid step are
  rounded away, so training stalls once ``lr |u|`` is small.
* :class:`SRUpdate` (Q-GaLore-style): ``w = Q_sr(w - lr u)`` with stochastic rounding, unbiased:
  ``E[w_new] = w - lr u``, so small updates survive in expectation.
* :class:`ECO`: ``w~ = w - lr u``; ``w = Q(w~)``; the rounding error ``e = w~ - w`` is injected into
  the momentum, ``m <- m - (1 - beta) / (lr beta) * e`` (rounding as the spec says: ``:sr`` or nearest).
* :class:`MasterWeights` (baseline): fp32 master ``W`` updated, ``w = Q(W)``.

Where the ECO rule comes from: Nikdan, Zandieh, Alistarh, Mirrokni, "ECO: Quantized Training without
Full-Precision Master Weights" (arXiv 2601.22101, 2026) describe ECO as quantizing the weights after
each step and injecting the quantization error into the optimizer momentum, with no extra memory. The
stored text available to us holds the abstract and summaries, not the paper's equations, so the
coefficient here is *derived*, by the standard virtual-iterate argument of error feedback: for
heavy-ball SGD ``m' = beta m + g``, ``w' = w - lr m'`` the point ``z = w - lr beta / (1 - beta) m``
moves as plain SGD, ``z' = z - lr / (1 - beta) g``. If the step lands on ``w' - e`` instead, setting
``m' <- m' - (1 - beta) / (lr beta) e`` keeps ``z`` on exactly that path, so ``z`` plays the role of
the master weight without being stored: nothing is lost, only delayed. The same holds for the EMA
momentum form ``m' = beta m + (1-beta) g``. For Adam the injection is scaled by the current
preconditioner and bias correction, ``m <- m - (1-b1)(1-b1^t) / (lr b1) * (sqrt(v_hat)+eps) * e``,
which is exact if ``v`` does not change between two steps (an approximation otherwise). ECO needs
``0 < beta < 1``. The injection uses the current ``lr``; under a changing learning rate ``z`` follows
the SGD path only approximately (the paper's guarantee is for a decaying rate).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch

from mixq.formats import Rounding
from mixq.quant import QuantSpec, fake_quantize

RULES = ("sgd", "adam")


def _as_spec(spec: QuantSpec | str | None, rounding: Rounding | None) -> QuantSpec | None:
    if spec is None:
        return None
    spec = spec if isinstance(spec, QuantSpec) else QuantSpec.parse(spec)
    return spec if rounding is None else replace(spec, rounding=rounding)


class _GridOptimizer(torch.optim.Optimizer):
    """Shared machinery: the update direction, the grid quantizer, and the seeded generator.

    Subclasses implement :meth:`_apply` (how ``w - lr u`` is stored). ``rounding``: a class-level
    override of the spec's element rounding (``None`` keeps the spec's own).
    """

    rounding: Rounding | None = None

    def __init__(self, params: Iterable[Any], *, lr: float, spec: QuantSpec | str | None, rule: str = "sgd",
                 momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, generator: torch.Generator | None = None, seed: int = 0) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"momentum and betas must lie in [0, 1), got {momentum}, {betas}")
        defaults = dict(lr=lr, spec=spec, rule=rule, momentum=momentum, betas=betas, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:  # parse once; errors name the bad token at construction
            group["spec"] = _as_spec(group["spec"], self.rounding)
            self._check_group(group)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    def _check_group(self, group: dict) -> None:
        """Subclass hook: validate a parameter group's hyperparameters."""

    def quantize(self, x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
        """``fake_quantize(x, spec)`` with this optimizer's generator (identity for ``spec=None``).

        A tensor of more than two dimensions (a conv weight ``[out, in, kh, kw]``) is quantized as the
        matrix ``[out, in*kh*kw]`` the layer multiplies with, so blocks and groups run along its
        reduction dimension as for a linear layer.
        """
        return x if spec is None else grid_quantize(x, spec, generator=self.generator)

    def _direction(self, p: torch.Tensor, group: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The update ``u`` (shape and dtype of ``p``) from ``p.grad``, and Adam's ``sqrt(v_hat) + eps``
        (None for SGD); updates the moment buffers in ``self.state[p]``."""
        g = p.grad
        if group["weight_decay"]:
            g = g.add(self._decayed(p), alpha=group["weight_decay"])
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        if group["rule"] == "sgd":
            beta = group["momentum"]
            if beta == 0:
                return g, None
            if "momentum" not in state:
                state["momentum"] = g.detach().clone()
            else:
                state["momentum"].mul_(beta).add_(g)
            return state["momentum"], None
        b1, b2 = group["betas"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])  # sqrt(v_hat) + eps
        return m / (1 - b1**t) / denom, denom

    def _decayed(self, p: torch.Tensor) -> torch.Tensor:
        """The weight the L2 term acts on (the parameter itself; the master copy in MasterWeights)."""
        return p.detach()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                u, denom = self._direction(p, group)
                self._apply(p, u, denom, group)
        return loss

    def _apply(self, p: torch.Tensor, u: torch.Tensor, denom: torch.Tensor | None, group: dict) -> None:
        """Store ``w - lr u`` into ``p`` (in place) the subclass's way; ``denom``: see :meth:`_direction`."""
        raise NotImplementedError


class NaiveQuantized(_GridOptimizer):
    """Control: ``w = Q(w - lr u)`` with round-to-nearest (the spec's rounding forced to nearest-even).

    State: the moments of ``rule`` only. Small updates are lost, so training stalls.
    """

    rounding = Rounding.NEAREST

    def _apply(self, p: torch.Tensor, u: torch.Tensor, denom: torch.Tensor | None, group: dict) -> None:
        p.copy_(self.quantize(p - group["lr"] * u, group["spec"]))


class SRUpdate(_GridOptimizer):
    """``w = Q_sr(w - lr u)``: stochastic rounding (forced, seeded by ``generator``/``seed``) to the grid.

    State: the moments of ``rule`` only. Unbiased: ``E[w_new] = w - lr u`` for targets inside the range.
    """

    rounding = Rounding.STOCHASTIC

    def _apply(self, p: torch.Tensor, u: torch.Tensor, denom: torch.Tensor | None, group: dict) -> None:
        p.copy_(self.quantize(p - group["lr"] * u, group["spec"]))


class ECO(_GridOptimizer):
    """Error-compensating optimizer: quantized weights, rounding error fed back into the momentum.

    Step (module docstring for the derivation): ``w~ = w - lr u``; ``w = Q(w~)`` (the spec's rounding,
    nearest or ``:sr``); ``e = w~ - w``; ``rule="sgd"``: ``m <- m - (1-beta)/(lr beta) e``;
    ``rule="adam"``: ``m <- m - (1-b1)(1-b1^t)/(lr b1) (sqrt(v_hat)+eps) e``.
    State: the momentum (and Adam's second moment); no master copy. Needs ``0 < beta < 1``.
    """

    def _check_group(self, group: dict) -> None:
        beta = group["momentum"] if group["rule"] == "sgd" else group["betas"][0]
        if not 0 < beta < 1:
            raise ValueError("ECO feeds the rounding error into the momentum, so it needs 0 < beta < 1; "
                             f"got {beta}")

    def _apply(self, p: torch.Tensor, u: torch.Tensor, denom: torch.Tensor | None, group: dict) -> None:
        w_target = p - group["lr"] * u  # w~, never kept beyond this step
        w_new = self.quantize(w_target, group["spec"])
        e = w_target - w_new  # what rounding removed from this step
        state, lr = self.state[p], group["lr"]
        if group["rule"] == "sgd":
            beta = group["momentum"]
            state["momentum"].add_(e, alpha=-(1 - beta) / (lr * beta))
        else:
            assert denom is not None  # Adam always returns its preconditioner
            b1, t = group["betas"][0], state["step"]
            coef = (1 - b1) * (1 - b1**t) / (lr * b1)
            state["exp_avg"].addcmul_(e, denom, value=-coef)
        p.copy_(w_new)


class MasterWeights(_GridOptimizer):
    """Baseline: an fp32 master copy ``W`` takes the update, the model weight is ``Q(W)``.

    The direction is computed from the gradient at the quantized weight (as in QAT) and, for weight
    decay, from the master. State: the moments of ``rule`` and ``"master"`` (fp32, shape of the param).
    """

    def _decayed(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().float().clone()
        return state["master"].to(p.dtype)

    def _apply(self, p: torch.Tensor, u: torch.Tensor, denom: torch.Tensor | None, group: dict) -> None:
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().float().clone()
        W = state["master"]
        W.add_(u.float(), alpha=-group["lr"])  # W - lr u: the step is taken from the master, not Q(W)
        p.copy_(self.quantize(W, group["spec"]).to(p.dtype))


def grid_quantize(x: torch.Tensor, spec: QuantSpec, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``fake_quantize`` of a weight in its matrix view ``[out, prod(rest)]`` (any shape with ndim >= 1)."""
    if x.dim() <= 2:
        return fake_quantize(x, spec, generator=generator)
    return fake_quantize(x.reshape(x.shape[0], -1), spec, generator=generator).reshape(x.shape)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, master copies), summed over parameters."""
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def state_shapes(opt: torch.optim.Optimizer) -> dict[str, list[tuple[int, ...]]]:
    """The shapes of every state tensor by state key (e.g. ``{"momentum": [(8, 32)]}``), for audits."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                shapes.setdefault(key, []).append(tuple(value.shape))
    return shapes


__all__ = ["ECO", "MasterWeights", "NaiveQuantized", "RULES", "SRUpdate", "state_bytes", "state_shapes"]
