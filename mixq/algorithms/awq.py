"""AWQ (Lin et al. 2023): activation-aware weight scaling and output-aware weight clipping.

Notation: ``X`` is ``[n, in]`` fp32 (rows are calibration inputs of the linears), ``W`` is
``[out, in]``, ``Q`` is ``fake_quantize(., spec)`` with the spec's groups along the input axis.

* :func:`awq_search` picks per-input-channel scales ``s = mean|X|^alpha`` (normalized), scanning
  ``alpha`` on a grid, so that ``(X / s) Q(W s)^T`` best matches ``X W^T``. The caller folds ``s``:
  divides the previous op's output channels by ``s`` and multiplies ``W[:, j]`` by ``s_j``.
* :func:`awq_clip` shrinks each quantization group's range by the ratio that minimizes the
  group's contribution to the output error, and returns the clamped (not quantized) weight.

Output errors ``||X D^T||^2`` of a weight difference ``D`` [out, in] are measured through a factor
``F`` ([k, in], ``F^T F = X^T X``, see :func:`awq_factor`): ``X`` itself when it has few rows, else
the ``R`` of a QR decomposition of ``X``, upper triangular ``[in, in]``, whose zero lower part the
products skip (0.55-0.7 of the multiply-adds of a dense ``[in, in]`` factor). Callers that run
several searches on one ``X`` may compute the factor once and pass it (``F / s`` is a factor of
``X / s``). Matrix products run in fp32, the final sums in fp64. When the spec quantizes rows on
their own, candidate weights are stacked and quantized in one call (few, large kernel calls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mixq.formats import Rounding
from mixq.quant import PerBlock, PerChannel, PerGroup, PerToken, QuantSpec, fake_quantize

STACK_ELEMENTS = 1 << 23  # candidate weights quantized in one call, at most (32 MB per fp32 buffer)


class AWQError(ValueError):
    """Inputs to AWQ that do not fit together (shapes, grid sizes, non-finite values)."""


@dataclass(frozen=True)
class AWQResult:
    """Scales of :func:`awq_search`.

    ``scales``: ``[in]`` fp32, all > 0: divide the previous op's output channels by ``s`` and
    multiply ``W[:, j]`` by ``s_j``. ``alpha``: the chosen exponent. ``loss`` / ``loss_before``:
    the mean squared output error with the chosen scales / with ``s = 1`` (plain RTN).
    """

    scales: Tensor
    alpha: float
    loss: float
    loss_before: float


def _as_spec(spec: QuantSpec | str) -> QuantSpec:
    return spec if isinstance(spec, QuantSpec) else QuantSpec.parse(spec)


def _check_inputs(X: Tensor, weights: list[Tensor], grid: int, factor: Tensor | None) -> None:
    if X.dim() != 2:
        raise AWQError(f"X must be [n, in], got shape {tuple(X.shape)}")
    if not weights:
        raise AWQError("expected at least one weight matrix [out, in], got an empty list")
    for i, W in enumerate(weights):
        if W.dim() != 2 or W.shape[1] != X.shape[1]:
            raise AWQError(f"weight {i} must be [out, {X.shape[1]}] to match X {tuple(X.shape)}, "
                           f"got {tuple(W.shape)}")
    if grid < 1:
        raise AWQError(f"grid must be >= 1, got {grid}")
    if factor is not None and (factor.dim() != 2 or factor.shape[1] != X.shape[1]):
        raise AWQError(f"factor must be [k, {X.shape[1]}] (F^T F = X^T X), got {tuple(factor.shape)}")
    if X.numel() and not torch.isfinite(torch.stack(torch.aminmax(X))).all():  # NaN propagates
        raise AWQError("X holds NaN or inf; calibration inputs must be finite")


def awq_factor(X: Tensor) -> Tensor:
    """A factor ``F`` of the inputs ``X`` ([n, in]): ``F^T F = X^T X``, so ``||X d|| = ||F d||``.

    ``X`` itself (fp32) when ``n <= in``; else ``R`` of ``X = Q R``, ``[in, in]`` fp32 upper
    triangular. ``F / s`` is a factor of ``X / s`` (``s``: [in] > 0).
    """
    X = X.float()
    return torch.linalg.qr(X, mode="r").R if X.shape[0] > X.shape[1] else X


def _factor_for(X: Tensor, rows: int, factor: Tensor | None) -> tuple[Tensor, bool]:
    """``(F, triangular)`` for measuring the errors of ``rows`` weight rows in total.

    A given ``factor`` is used as is; otherwise QR's ``R`` when computing it (about ``2 n in^2``)
    and ``rows`` triangular products (about ``0.7 in^2`` each) beat ``rows`` products with ``X``
    (``n in`` each), else ``X``. ``triangular``: ``F`` is square and upper triangular.
    """
    if factor is None:
        n, in_f = X.shape
        pays = n > in_f and in_f * (20 * n + 7 * rows) < 10 * rows * n
        factor = awq_factor(X) if pays else X
    F = factor.to(device=X.device, dtype=torch.float32)
    return F, F.shape[0] == F.shape[1] and not bool(F.tril(-1).any())


def _rows_independent(spec: QuantSpec) -> bool:
    """Whether ``Q`` treats each row of a ``[rows, in]`` matrix alone, the same wherever it sits
    (groups inside rows or one per row, no tensor scale, no position-seeded stochastic rounding):
    then row-stacked matrices can be quantized in one call, and a row mix of two matrices
    quantizes to the same row mix of their quantized values."""
    g = spec.granularity
    per_row = (isinstance(g, PerGroup) and g.axis in (-1, 1)) or isinstance(g, PerToken) or (
        isinstance(g, PerChannel) and g.axis in (0, -2))
    return per_row and spec.scale.tensor_scale is None and spec.rounding is not Rounding.STOCHASTIC


def _quantize_stack(A: Tensor, spec: QuantSpec, sizes: list[int] | None = None) -> Tensor:
    """``Q`` of stacked candidates ``A`` ([b, rows, in] fp32) -> [b, rows, in] fp32.

    Each ``A[j]`` stacks matrices of ``sizes`` rows (default: one matrix), each quantized as a
    matrix of its own: in one call when :func:`_rows_independent`, else one call per matrix.
    """
    if _rows_independent(spec):
        return fake_quantize(A.reshape(-1, A.shape[-1]), spec).view(A.shape)
    P = torch.empty_like(A)
    for Aj, Pj in zip(A, P):
        for a, p in zip(Aj.split(sizes or [A.shape[1]]), Pj.split(sizes or [A.shape[1]])):
            fake_quantize(a, spec, out=p)
    return P


def _row_sq_errors(F: Tensor, triangular: bool, D: Tensor) -> Tensor:
    """Per output row ``||F d_o||^2 = ||X d_o||^2`` ([out] fp32) for a weight difference ``D`` [out, in].

    Rows ``[a, a + step)`` of an upper-triangular ``F`` are zero left of column ``a``: their
    product reads ``D[:, a:]`` only.
    """
    step = 192 if triangular else 1024
    err = D.new_zeros(D.shape[0])
    for a in range(0, F.shape[0], step):
        c = a if triangular else 0
        err += (D[:, c:] @ F[a:a + step, c:].T).square_().sum(dim=1)  # [out, step] -> [out]
    return err


@torch.no_grad()
def awq_search(X: Tensor, weights: list[Tensor], spec: QuantSpec | str, *, grid: int = 20,
               factor: Tensor | None = None) -> AWQResult:
    """Grid search of AWQ scales shared by all ``weights`` (``[out_i, in]``) reading ``X`` ([n, in]).

    For ``alpha`` in ``linspace(0, 1, grid)``: ``s = clamp(mean|X|^alpha, 1e-4)``, normalized by
    ``sqrt(max(s) min(s))``; the loss is the mean over all ``n * sum(out_i)`` outputs of
    ``(X W_i^T - (X / s) Q(W_i s)^T)^2``. ``alpha = 0`` (``s = 1``) is plain RTN; ties keep the
    smaller ``alpha``. ``factor``: optional :func:`awq_factor` of ``X``. All math in fp32 on
    ``X``'s device (sums of errors in fp64).
    """
    spec = _as_spec(spec)
    _check_inputs(X, weights, grid, factor)
    X = X.float()
    Ws = [W.to(device=X.device, dtype=torch.float32) for W in weights]
    W = torch.cat(Ws)  # [O, in], O = sum(out_i)
    O, in_f = W.shape
    x_mean = X.abs().mean(dim=0)  # [in]
    alphas = torch.linspace(0.0, 1.0, grid).tolist()
    S = torch.ones(grid, in_f, device=X.device)  # [grid, in]: s of each alpha, 1 for alpha = 0
    for i, alpha in enumerate(alphas[1:], start=1):
        s = x_mean.pow(alpha).clamp(min=1e-4)
        S[i] = s / (s.max() * s.min()).sqrt()
    F, tri = _factor_for(X, grid * O, factor)
    count = max(X.shape[0] * O, 1)
    losses: list[float] = []
    batch = max(1, STACK_ELEMENTS // max(W.numel(), 1))
    for i in range(0, grid, batch):
        Sb = S[i:i + batch, None, :]  # [b, 1, in]
        P = _quantize_stack(W * Sb, spec, [Wi.shape[0] for Wi in Ws])  # Q(W_i s), [b, O, in]
        D = torch.sub(W, P.div_(Sb), out=P)  # X W^T - (X/s) Q(W s)^T = X D^T
        err = _row_sq_errors(F, tri, D.view(-1, in_f)).view(-1, O).sum(dim=1, dtype=torch.float64)  # [b]
        losses += [v / count for v in err.tolist()]
    best = 0
    for i, loss in enumerate(losses):  # ties keep the smaller alpha
        if loss < losses[best]:
            best = i
    return AWQResult(scales=S[best].clone(), alpha=float(alphas[best]), loss=losses[best],
                     loss_before=losses[0])


def _clip_group_size(spec: QuantSpec, in_features: int) -> int:
    """Columns per clipping unit: the spec's group width along the input axis, else the whole row."""
    g = spec.granularity
    if isinstance(g, PerGroup) and g.axis in (-1, 1):
        return g.size
    if isinstance(g, PerBlock):
        return g.cols
    return in_features


def _unit_errors(Xs: Tensor, grams: Tensor | None, E: Tensor) -> Tensor:
    """Output error of each (row, group) unit, ``||X_g e_{o,g}||^2`` -> [out, G] fp32.

    ``E``: [out, G, g] weight errors; ``Xs``: [n, G, g] inputs (or factor rows); ``grams``:
    [G, g, g] (``X_g^T X_g``) or None.
    """
    Et = E.transpose(0, 1)  # [G, out, g]
    if grams is not None:
        return torch.bmm(Et, grams).mul_(Et).sum(dim=-1).T
    rows = []
    for i in range(0, E.shape[0], 1024):
        P = Xs.transpose(0, 1) @ Et[:, i:i + 1024].transpose(1, 2)  # [G, n, rows]
        rows.append(P.square_().sum(dim=1).T)  # [rows, G]
    return torch.cat(rows)


@torch.no_grad()
def awq_clip(W: Tensor, X: Tensor, spec: QuantSpec | str, *, grid: int = 20,
             max_shrink: float = 0.5, factor: Tensor | None = None) -> Tensor:
    """``W`` ([out, in]) clamped per quantization group to the range ratio with least output error.

    Units are (output row, group of input columns of the spec; the whole row for per-channel or
    per-tensor specs). Ratios ``r`` in ``linspace(1, 1 - max_shrink, grid)`` clamp a unit to
    ``[-r amax, r amax]`` (asymmetric specs: ``[r min, r max]``); each unit keeps the ``r`` whose
    ``||X_g (W_g - Q(W_g))^T||^2`` is least, measured through the ``X_g^T X_g`` Gram blocks, or on
    at most 1024 evenly spaced rows of ``X`` when there are fewer rows than group columns. A final
    check on all of ``X`` keeps, per row, whichever of clipped and unclipped has less output error
    (and the unclipped weight altogether if coupled scales, e.g. a tensor scale, made the total
    worse), so ``||X W^T - X Q(result)^T||`` is never above that of ``Q(W)``. ``factor``: optional
    :func:`awq_factor` of ``X``. Returns fp32, not quantized.
    """
    spec = _as_spec(spec)
    _check_inputs(X, [W], grid, factor)
    if not 0 <= max_shrink < 1:
        raise AWQError(f"max_shrink must be in [0, 1), got {max_shrink}")
    X = X.float()
    W = W.to(device=X.device, dtype=torch.float32).contiguous()
    out_f, in_f = W.shape
    g = _clip_group_size(spec, in_f)
    if in_f % g:
        raise AWQError(f"group width {g} of {spec} does not divide the {in_f} input features of W")
    G = in_f // g
    F, tri = _factor_for(X, 2 * out_f, factor)  # [k, in]; two row-error evaluations at the end
    k = F.shape[0]
    F3 = F.reshape(k, G, g)
    grams = torch.bmm(F3.permute(1, 2, 0), F3.transpose(0, 1)) if g <= k else None  # [G, g, g]
    if grams is None and k > 1024:
        F3 = F3[torch.linspace(0, k - 1, 1024, device=F.device).long()]  # [1024, G, g]

    W3 = W.view(out_f, G, g)
    if spec.scale.asymmetric:
        lo, hi = W3.amin(dim=-1, keepdim=True), W3.amax(dim=-1, keepdim=True)  # [out, G, 1]
    else:
        hi = W3.abs().amax(dim=-1, keepdim=True)
        lo = -hi
    best, best_err = W3.clone(), None
    ratios = torch.linspace(1.0, 1.0 - max_shrink, max(grid, 1)).tolist()
    batch = max(1, STACK_ELEMENTS // max(W.numel(), 1)) if _rows_independent(spec) else 1
    for i in range(0, len(ratios), batch):
        r = torch.tensor(ratios[i:i + batch], device=W.device).view(-1, 1, 1, 1)  # [b, 1, 1, 1]
        C = torch.clamp(W3, lo * r, hi * r)  # [b, out, G, g]; r = 1 leaves W3 as it is
        E = _quantize_stack(C.view(-1, out_f, in_f), spec)
        torch.sub(W, E, out=E)  # errors against the float W, [b, out, in]
        for Cj, Ej in zip(C, E):
            err = _unit_errors(F3, grams, Ej.view(out_f, G, g))  # [out, G]
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            torch.where(better, err, best_err, out=best_err)
            torch.where(better[..., None], Cj, best, out=best)
    return _never_worse(W, best.reshape(out_f, in_f), F, tri, spec)


def _never_worse(W: Tensor, C: Tensor, F: Tensor, tri: bool, spec: QuantSpec) -> Tensor:
    """Per row the better of clipped ``C`` and ``W``; ``W`` itself if the mix is worse in total.

    ``W``, ``C``: [out, in] fp32; ``F``: [k, in] factor of the inputs, upper triangular if ``tri``.
    """
    QW, QC = _quantize_stack(torch.stack([W, C]), spec)
    err_w = _row_sq_errors(F, tri, W - QW)  # [out]
    err_c = _row_sq_errors(F, tri, W - QC)
    take = (err_c < err_w)[:, None]  # [out, 1]
    if not bool(take.any()):
        return W.clone()
    M = torch.where(take, C, W)
    if _rows_independent(spec):  # Q(M) mixes the rows of Q(C) and Q(W): each row's error is the smaller
        return M
    err_m = _row_sq_errors(F, tri, W - fake_quantize(M, spec)).sum()
    return M if err_m <= err_w.sum() and math.isfinite(float(err_m)) else W.clone()
