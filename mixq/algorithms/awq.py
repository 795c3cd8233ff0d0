"""AWQ (Lin et al. 2023): activation-aware weight scaling and output-aware weight clipping.

Notation: ``X`` is ``[n, in]`` fp32 (rows are calibration inputs of the linears), ``W`` is
``[out, in]``, ``Q`` is ``fake_quantize(., spec)`` with the spec's groups along the input axis.

* :func:`awq_search` picks per-input-channel scales ``s = mean|X|^alpha`` (normalized), scanning
  ``alpha`` on a grid, so that ``(X / s) Q(W s)^T`` best matches ``X W^T``. The caller folds ``s``:
  divides the previous op's output channels by ``s`` and multiplies ``W[:, j]`` by ``s_j``.
* :func:`awq_clip` shrinks each quantization group's range by the ratio that minimizes the
  group's contribution to the output error, and returns the clamped (not quantized) weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mixq.quant import PerBlock, PerGroup, QuantSpec, fake_quantize


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


def _check_inputs(X: Tensor, weights: list[Tensor], grid: int) -> None:
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
    if not torch.isfinite(X).all():
        raise AWQError("X holds NaN or inf; calibration inputs must be finite")


def _gram(X: Tensor) -> Tensor | None:
    """``X^T X`` ([in, in] fp32) when that makes output errors cheaper than using ``X``, else None."""
    return X.T @ X if X.shape[0] > X.shape[1] else None


def _row_sq_errors(X: Tensor, H: Tensor | None, D: Tensor, chunk: int = 2048) -> Tensor:
    """Per output row ``||X d_o||^2`` ([out] fp32) for a weight difference ``D`` [out, in].

    ``H = X^T X`` (from :func:`_gram`) is used when given: ``d_o^T H d_o``.
    """
    if H is not None:
        return ((D @ H) * D).sum(dim=1)
    parts = [((X @ D[i:i + chunk].T) ** 2).sum(dim=0) for i in range(0, D.shape[0], chunk)]  # [rows]
    return torch.cat(parts) if parts else D.new_zeros(0)


def awq_search(X: Tensor, weights: list[Tensor], spec: QuantSpec | str, *, grid: int = 20) -> AWQResult:
    """Grid search of AWQ scales shared by all ``weights`` (``[out_i, in]``) reading ``X`` ([n, in]).

    For ``alpha`` in ``linspace(0, 1, grid)``: ``s = clamp(mean|X|^alpha, 1e-4)``, normalized by
    ``sqrt(max(s) min(s))``; the loss is the mean over all ``n * sum(out_i)`` outputs of
    ``(X W_i^T - (X / s) Q(W_i s)^T)^2``. ``alpha = 0`` (``s = 1``) is plain RTN; ties keep the
    smaller ``alpha``. All math in fp32 on ``X``'s device.
    """
    spec = _as_spec(spec)
    _check_inputs(X, weights, grid)
    X = X.float()
    Ws = [W.to(device=X.device, dtype=torch.float32) for W in weights]
    x_mean = X.abs().mean(dim=0)  # [in]
    H = _gram(X)
    count = X.shape[0] * sum(W.shape[0] for W in Ws)

    def loss_of(s: Tensor) -> float:
        total = 0.0
        for W in Ws:
            D = W - fake_quantize(W * s, spec) / s  # X W^T - (X/s) Q(Ws)^T = X D^T, [out, in]
            total += float(_row_sq_errors(X, H, D).sum())
        return total / max(count, 1)

    ones = torch.ones_like(x_mean)
    best_s, best_alpha = ones, 0.0
    loss_before = best_loss = loss_of(ones)
    for alpha in torch.linspace(0.0, 1.0, grid).tolist()[1:]:
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = loss_of(s)
        if loss < best_loss:
            best_s, best_alpha, best_loss = s, alpha, loss
    return AWQResult(scales=best_s.float(), alpha=float(best_alpha), loss=best_loss, loss_before=loss_before)


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

    ``E``: [out, G, g] weight errors; ``Xs``: [n, G, g] inputs; ``grams``: [G, g, g] or None.
    """
    Et = E.transpose(0, 1)  # [G, out, g]
    if grams is not None:
        return ((Et @ grams) * Et).sum(dim=-1).T
    rows = []
    for i in range(0, E.shape[0], 1024):
        P = Xs.transpose(0, 1) @ Et[:, i:i + 1024].transpose(1, 2)  # [G, n, rows]
        rows.append((P ** 2).sum(dim=1).T)  # [rows, G]
    return torch.cat(rows)


def awq_clip(W: Tensor, X: Tensor, spec: QuantSpec | str, *, grid: int = 20,
             max_shrink: float = 0.5) -> Tensor:
    """``W`` ([out, in]) clamped per quantization group to the range ratio with least output error.

    Units are (output row, group of input columns of the spec; the whole row for per-channel or
    per-tensor specs). Ratios ``r`` in ``linspace(1, 1 - max_shrink, grid)`` clamp a unit to
    ``[-r amax, r amax]`` (asymmetric specs: ``[r min, r max]``); each unit keeps the ``r`` whose
    ``||X_g (W_g - Q(W_g))^T||^2`` is least, measured on at most 1024 evenly spaced rows of ``X``
    when cheaper than the ``X_g^T X_g`` Gram matrices. A final check on all of ``X`` keeps, per
    row, whichever of clipped and unclipped has less output error (and the unclipped weight
    altogether if coupled scales, e.g. a tensor scale, made the total worse), so the output error
    ``||X W^T - X Q(result)^T||`` is never above that of ``Q(W)``. Returns fp32, not quantized.
    """
    spec = _as_spec(spec)
    _check_inputs(X, [W], grid)
    if not 0 <= max_shrink < 1:
        raise AWQError(f"max_shrink must be in [0, 1), got {max_shrink}")
    X = X.float()
    W = W.to(device=X.device, dtype=torch.float32)
    out_f, in_f = W.shape
    g = _clip_group_size(spec, in_f)
    if in_f % g:
        raise AWQError(f"group width {g} of {spec} does not divide the {in_f} input features of W")
    G = in_f // g
    n = X.shape[0]
    use_gram = g <= n
    Xs = X if use_gram or n <= 1024 else X[torch.linspace(0, n - 1, 1024, device=X.device).long()]
    X3 = Xs.reshape(-1, G, g)  # [n', G, g]
    grams = X3.permute(1, 2, 0) @ X3.transpose(0, 1) if use_gram else None  # [G, g, g]

    W3 = W.reshape(out_f, G, g)
    if spec.scale.asymmetric:
        lo, hi = W3.amin(dim=-1, keepdim=True), W3.amax(dim=-1, keepdim=True)  # [out, G, 1]
    else:
        hi = W3.abs().amax(dim=-1, keepdim=True)
        lo = -hi
    best = W3.clone()
    best_err = None
    for r in torch.linspace(1.0, 1.0 - max_shrink, max(grid, 1)).tolist():
        C = torch.clamp(W3, lo * r, hi * r) if r < 1 else W3
        E = W3 - fake_quantize(C.reshape(out_f, in_f), spec).reshape(out_f, G, g)  # vs the float W
        err = _unit_errors(X3, grams, E)  # [out, G]
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], C, best)
    return _never_worse(W, best.reshape(out_f, in_f), X, spec)


def _never_worse(W: Tensor, C: Tensor, X: Tensor, spec: QuantSpec) -> Tensor:
    """Per row the better of clipped ``C`` and ``W``; ``W`` itself if the mix is worse in total."""
    H = _gram(X)
    err_w = _row_sq_errors(X, H, W - fake_quantize(W, spec))  # [out]
    err_c = _row_sq_errors(X, H, W - fake_quantize(C, spec))
    M = torch.where((err_c < err_w)[:, None], C, W)
    if torch.equal(M, W):
        return W.clone()
    err_m = _row_sq_errors(X, H, W - fake_quantize(M, spec)).sum()
    return M if err_m <= err_w.sum() and math.isfinite(float(err_m)) else W.clone()
