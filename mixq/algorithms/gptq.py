"""GPTQ (Frantar et al., 2022) on any grid of mixq.

Columns of ``W`` ([out, in]) are quantized one at a time; the error of each is spread over the
columns not yet quantized through the upper Cholesky factor ``U`` of ``H^-1``:
``E = (w - q) / U[i, i]``, ``W[:, i+1:] -= E U[i, i+1:]`` (within a block of ``block_size`` columns,
then once per block for the rest: the lazy batch update).

Scales follow the spec's own rule (absmax, asymmetric, MSE clip search, scale format and its
floor/ceil/nearest rounding). Groups along the input axis (``gN``, 1-D blocks of MX/NV formats)
get their scales when the first of their columns is reached, from the current (already updated)
weights of the group; a tensor scale (NVFP4's fp32 second level) comes once from the original
``W``. Every other granularity (tensor, channel, ``gN@0``, 2-D blocks), and all groups with
``static_groups=True``, take their scales from the original ``W`` up front. The result lies
exactly on the spec's grid with the scales returned in ``info["scales"]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mixq.algorithms.hessian import layer_loss
from mixq.algorithms.rtn import WeightResult, squared_error
from mixq.formats import FloatFormat, GridFormat, IntFormat, Rounding
from mixq.quant import Grouping, PerGroup, PerToken, QuantSpec
from mixq.quant.core import choose_scales, qdq_groups
from mixq.quant.kernels import grid_thresholds
from mixq.quant.scale import GroupScales, tensor_scale

# Scales are chosen with the torch reference (backend "torch", bit-identical to the compiled kernels):
# the first launch of a numba kernel in a process resets torch's thread count to the number of
# cores, which makes the many small tensor ops of the column loop much slower on a busy machine.

DAMP_TRIES = 5  # damp, then x10 each try (from at least 1e-4 when damp is 0)


class GPTQError(ValueError):
    """Inputs GPTQ cannot work on: shapes, granularity, non-finite values, an indefinite Hessian."""


@dataclass
class _Scales:
    """Scales of every element of ``W``, stored by column: ``[in, out]`` fp32 (``zero``/``offset``
    None when the spec has none); ``tensor``: the 0-d tensor scale or None."""

    scale: torch.Tensor
    block: torch.Tensor
    zero: torch.Tensor | None
    offset: torch.Tensor | None
    tensor: torch.Tensor | None

    def column(self, j: int) -> GroupScales:
        """Scales of column ``j`` as ``out`` groups of one element."""
        return GroupScales(self.scale[j], self.block[j], None if self.zero is None else self.zero[j],
                           self.tensor, None if self.offset is None else self.offset[j])

    def fill(self, cols: slice, sc: GroupScales) -> None:
        """Set columns ``cols`` to the per-row scales ``sc`` ([out] each)."""
        self.scale[cols] = sc.scale
        self.block[cols] = sc.block
        if self.zero is not None:
            self.zero[cols] = sc.zero
        if self.offset is not None:
            self.offset[cols] = sc.offset

    def as_groups(self, grouping: Grouping) -> GroupScales:
        """The scales in the group order of ``grouping`` ([G] each), as ``choose_scales`` returns them."""
        def first(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else grouping.to_groups(t.T)[:, 0].contiguous()
        return GroupScales(first(self.scale), first(self.block), first(self.zero), self.tensor, first(self.offset))


def _static_scales(W: torch.Tensor, spec: QuantSpec, grouping: Grouping) -> _Scales:
    """All scales from ``W`` ([out, in] fp32) at once, spread to every element."""
    X = grouping.to_groups(W).contiguous()  # [G, n]
    sc = choose_scales(X, spec, 0, "torch")
    G, n = X.shape
    gid = grouping.from_groups(torch.arange(G, device=W.device)[:, None].expand(G, n)).T  # [in, out]

    def spread(v: torch.Tensor | None) -> torch.Tensor | None:
        return None if v is None else v[gid]
    return _Scales(spread(sc.scale), spread(sc.block), spread(sc.zero), spread(sc.offset), sc.tensor)


def _empty_scales(W: torch.Tensor, spec: QuantSpec) -> _Scales:
    """Tables to be filled group by group; the tensor scale from the whole of ``W`` now."""
    S = tensor_scale(W.abs().amax(dim=1), spec)
    new = lambda: torch.full((W.shape[1], W.shape[0]), torch.nan, device=W.device)  # noqa: E731
    zero = new() if spec.scale.asymmetric and not spec.scale.offset else None
    return _Scales(new(), new(), zero, new() if spec.scale.offset else None, S)


class _ColumnQuantizer:
    """Quantize-dequantize one column ``w`` ([out] fp32) with the fixed scales of its column.

    Equal bit for bit to ``qdq_groups(w[:, None], scales.column(j), spec, j, "torch")``; round to
    nearest on integers and on small grids (signed saturating minifloats of <= 8 bits with
    subnormals, lookup grids) take a shorter path: integers by ``round``/``clamp``, grids by ``searchsorted`` over the
    fp32 midpoint thresholds of the compiled kernels (ties to the even code).
    """

    def __init__(self, spec: QuantSpec, device: torch.device) -> None:
        self.spec, self.kind, self.mirror = spec, "generic", False
        fmt = spec.format
        if spec.rounding is not Rounding.NEAREST or spec.scale.offset:
            return
        if isinstance(fmt, IntFormat):
            self.kind, self.unit, self.qmin, self.qmax = "int", fmt.unit, float(fmt.qmin), float(fmt.qmax)
            return
        if isinstance(fmt, GridFormat):
            L = fmt.level_tensor()  # sorted float64
        elif (isinstance(fmt, FloatFormat) and fmt.saturate and fmt.is_signed and fmt.subnormals
              and fmt.specials != "fnuz" and fmt.bits <= 8):
            v = fmt.values().double()
            L, self.mirror = v[v >= 0], True  # magnitudes; the code of +v is its index (ties to even code)
        else:
            return
        self.kind = "levels"
        self.levels = L.float().to(device)
        self.thresholds = torch.from_numpy(grid_thresholds(L.numpy())).to(device)

    def __call__(self, w: torch.Tensor, sc: _Scales, j: int) -> torch.Tensor:
        if self.kind == "generic":
            return qdq_groups(w[:, None], sc.column(j), self.spec, j, "torch")[:, 0]
        s = sc.scale[j]
        y = w / s  # [out]
        if self.kind == "int":
            r = torch.round(y if self.unit == 1.0 else y / self.unit)
            if sc.zero is None:
                return (r.clamp_(self.qmin, self.qmax) * self.unit) * s
            z = sc.zero[j]
            return ((r + z).clamp_(self.qmin, self.qmax) - z) * s
        idx = torch.searchsorted(self.thresholds, y.abs() if self.mirror else y)  # #{t < y}
        q = self.levels[idx]
        if self.mirror:
            q = torch.where(torch.signbit(y), -q, q)
        return torch.where(torch.isnan(y), y, q) * s


def _dynamic_group(spec: QuantSpec, static_groups: bool) -> int | None:
    """Size of the groups along the input axis whose scales follow the updates, or None (static)."""
    g = spec.granularity
    if isinstance(g, PerToken):
        raise GPTQError(f"per-token granularity is for activations; a weight needs tensor, channel, group or "
                        f"block scales, got spec {spec}")
    if static_groups or not isinstance(g, PerGroup) or g.axis % 2 != 1:
        return None
    return g.size


def _upper_cholesky_inverse(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + d mean(diag H) I)^-1`` (fp64 in, fp32 out) and the ``d`` used."""
    mean = H.diagonal().mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    d = damp
    for _ in range(DAMP_TRIES):
        L, info = torch.linalg.cholesky_ex(H + (d * mean) * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U.float().contiguous(), d
        d = max(d * 10.0, 1e-4)
    raise GPTQError(f"H is not positive definite even with damping {d / 10:g} * mean(diag(H)) after "
                    f"{DAMP_TRIES} tries; expected a Hessian X^T X of finite inputs")


def _current(pos: list[int], Wt: torch.Tensor, W1: torch.Tensor, E1: torch.Tensor, U: torch.Tensor,
             i1: int, i: int, i2: int) -> torch.Tensor:
    """Present values ([out, len(pos)]) of working columns ``pos`` (none quantized yet) while column
    ``i1 + i`` of block ``[i1, i2)`` is next: columns past the block still lack its lazy update.
    ``Wt`` ([in, out]), ``W1`` and ``E1`` ([b, out]) hold columns as rows."""
    if pos == list(range(pos[0], pos[0] + len(pos))) and pos[-1] < i2:
        return W1[pos[0] - i1:pos[-1] + 1 - i1].T.contiguous()
    cur = Wt[pos].clone()  # [len, out]
    inside = [k for k, p in enumerate(pos) if p < i2]
    outside = [k for k, p in enumerate(pos) if p >= i2]
    if inside:
        cur[inside] = W1[[pos[k] - i1 for k in inside]]
    if outside and i > 0:
        cur[outside] -= U[i1:i1 + i, [pos[k] for k in outside]].T @ E1[:i]
    return cur.T.contiguous()


def _check(W: torch.Tensor, H: torch.Tensor, block_size: int, damp: float) -> None:
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise GPTQError(f"expected W [out, in] and H [in, in], got W {tuple(W.shape)} and H {tuple(H.shape)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise GPTQError(f"block_size must be a positive integer, got {block_size!r}")
    if not damp >= 0:
        raise GPTQError(f"damp must be >= 0, got {damp!r}")
    if W.numel() and not (bool(torch.isfinite(W.abs().amax())) and bool(torch.isfinite(H.abs().amax()))):
        raise GPTQError("W and H must be finite; found NaN or inf")


def gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec | str, *, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False, static_groups: bool = False) -> WeightResult:
    """Quantize ``W`` ([out, in], any float dtype; fp32 math on its device) with GPTQ.

    ``H`` ([in, in]): the layer Hessian ``(2/n) X^T X``. ``damp``: relative to ``mean(diag(H))``,
    raised x10 while the Cholesky factorisation fails. ``act_order``: columns in order of
    decreasing ``diag(H)``. ``static_groups``: all group scales from the original ``W`` up front.
    ``info``: ``dead`` (inputs with ``H[i, i] == 0``, whose weights become 0), ``damp`` (used),
    ``scales`` (``GroupScales`` in the group order of ``Grouping(W.shape, spec.granularity)``),
    ``perm`` (column order, or None), ``seconds``.
    """
    t0 = time.perf_counter()
    spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
    _check(W, H, block_size, damp)
    g = _dynamic_group(spec, static_groups)
    grouping = Grouping(tuple(W.shape), spec.granularity)  # validates the group sizes
    W0 = W.detach().float()
    n = W0.shape[1]
    scales = _static_scales(W0, spec, grouping) if g is None else _empty_scales(W0, spec)
    ready = [g is None] * (n // g if g else 1)

    H64 = H.detach().to(W0.device, torch.float64).clone()
    Wk = W0.clone()
    dead = H64.diagonal() == 0
    H64[dead, dead] = 1.0
    Wk[:, dead] = 0.0
    perm = torch.argsort(H64.diagonal(), descending=True, stable=True) if act_order else None
    if perm is not None:
        Wk, H64 = Wk[:, perm], H64[perm][:, perm]
    U, used = _upper_cholesky_inverse(H64, damp)  # [in, in] fp32, contiguous
    order = perm.tolist() if perm is not None else list(range(n))  # working position -> column of W
    pos_of = [0] * n
    for p, c in enumerate(order):
        pos_of[c] = p

    quant = _ColumnQuantizer(spec, W0.device)
    Wt = Wk.T.contiguous()  # [in, out]: a column of W is a contiguous row here
    Qt = torch.empty_like(Wt)
    diag = U.diagonal().tolist()
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = Wt[i1:i2].clone()  # [b, out]
        E1 = torch.empty_like(W1)  # scaled errors of the block
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = order[i1 + i]
            if not ready[j // g if g else 0]:
                k0 = j - j % g  # the group's columns in W's order
                cur = _current([pos_of[c] for c in range(k0, k0 + g)], Wt, W1, E1, U, i1, i, i2)
                kw = {"tensor": scales.tensor} if scales.tensor is not None else {}
                scales.fill(slice(k0, k0 + g), choose_scales(cur, spec, 0, "torch", **kw))
                ready[j // g] = True
            w = W1[i]
            q = quant(w, scales, j)
            Qt[i1 + i] = q
            e = E1[i]
            torch.sub(w, q, out=e).div_(diag[i1 + i])
            W1[i + 1:].addr_(U1[i, i + 1:], e, alpha=-1.0)
        if i2 < n:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)
    Q = Qt.T if perm is None else Qt[torch.tensor(pos_of, device=Qt.device)].T
    Q = Q.contiguous()

    info = {"dead": int(dead.sum()), "damp": used, "scales": scales.as_groups(grouping), "perm": perm,
            "seconds": time.perf_counter() - t0}
    return WeightResult(Q, layer_loss(W0, Q, H), squared_error(W0, Q), info)
