"""Orthonormal Hadamard matrices and rotations for incoherence processing (QuaRot / SpinQuant style).

A Hadamard matrix of order n has entries +-1 and ``H H^T = n I``; every matrix returned here is
normalized, ``H / sqrt(n)``, so it is orthonormal. Such matrices exist only for n = 1, 2 or a multiple
of 4. The orders constructed here are:

- Sylvester: ``n = 2^k``;
- Paley I: ``n = p + 1`` for a prime ``p = 3 (mod 4)`` (e.g. 12, 20, 24, 32, 44, 48, 60, ...);
- Paley II: ``n = 2 (p + 1)`` for a prime ``p = 1 (mod 4)`` (e.g. 12, 28, 36, 60, 76, ...);
- Kronecker products of the above (e.g. 96 = 12 * 8, 576 = 12 * 48, 1536 = 12 * 128).

Conventions: a rotation acts on row vectors, ``y = x @ M^T`` (like ``nn.Linear``).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

ROTATION_KINDS = ("hadamard", "random")


class HadamardError(ValueError):
    """No Hadamard matrix of the requested order can be built here; the message names the order."""


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    if p % 2 == 0:
        return p == 2
    return all(p % d for d in range(3, math.isqrt(p) + 1, 2))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _direct_kind(n: int) -> str | None:
    """How a single (non-Kronecker) matrix of order n is built: "sylvester", "paley1", "paley2" or None."""
    if _is_power_of_two(n):
        return "sylvester"
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return "paley1"
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _proper_factors(n: int) -> list[int]:
    """Directly constructible divisors m of n, 2 < m < n, not powers of two, ascending."""
    return [m for m in range(3, n // 2 + 1)
            if n % m == 0 and not _is_power_of_two(m) and _direct_kind(m) is not None]


@functools.lru_cache(maxsize=256)
def _factorization(n: int) -> tuple[int, ...] | None:
    """Orders whose Kronecker product is n, each directly constructible; None when there is none.

    Preference (deterministic): a power of two itself; else the smallest directly constructible m with
    n / m a power of two (QuaRot's ``H_m x H_{2^k}``, cheap to build); else n itself when direct; else
    the smallest constructible m whose cofactor has a factorization.
    """
    if _is_power_of_two(n):
        return (n,)
    if n < 4 or n % 4:
        return None if _direct_kind(n) is None else (n,)
    candidates = _proper_factors(n)
    for m in candidates:
        if _is_power_of_two(n // m):
            return (m, n // m)
    if _direct_kind(n) is not None:
        return (n,)
    for m in candidates:
        rest = _factorization(n // m)
        if rest is not None:
            return (m, *rest)
    return None


def _sylvester(n: int) -> Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.kron(base, H)
    return H                                                           # [n, n] of +-1


def _jacobsthal(p: int) -> Tensor:
    """Q[i, j] = legendre(j - i mod p), with 0 on the diagonal; [p, p] fp64 (a circulant)."""
    chi = torch.full((p,), -1.0, dtype=torch.float64)
    chi[torch.arange(1, p) ** 2 % p] = 1.0
    chi[0] = 0.0
    c2 = torch.cat([chi, chi])                                         # c2[k] = chi[k mod p]
    # Q[p-1-r, j] = chi[(j + r + 1) mod p] = c2[1 + r + j]: a Hankel view, flipped into place.
    return c2.as_strided((p, p), (1, 1), 1).flip(0)                    # [p, p]


def _conference(p: int, antisymmetric: bool) -> Tensor:
    """The (p+1) x (p+1) conference matrix bordering the Jacobsthal matrix of p."""
    S = torch.zeros(p + 1, p + 1, dtype=torch.float64)
    S[0, 1:] = 1.0
    S[1:, 0] = -1.0 if antisymmetric else 1.0
    S[1:, 1:] = _jacobsthal(p)
    return S


def _paley1(n: int) -> Tensor:
    S = _conference(n - 1, antisymmetric=True)
    return S + torch.eye(n, dtype=torch.float64)                       # [n, n] of +-1


def _paley2(n: int) -> Tensor:
    S = _conference(n // 2 - 1, antisymmetric=False)
    on = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    off = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    zero = (S == 0).double()
    return torch.kron(S, on) + torch.kron(zero, off)                   # [n, n] of +-1


def _unnormalized(n: int) -> Tensor:
    factors = _factorization(n)
    if factors is None:
        raise HadamardError(
            f"expected an order n with a constructible Hadamard matrix, found n={n}: supported orders are 1, "
            f"2^k, p+1 (p prime = 3 mod 4), 2(p+1) (p prime = 1 mod 4) and products of these"
            + ("" if n in (1, 2) or (n > 0 and n % 4 == 0) else
               " (Hadamard matrices exist only for n = 1, 2 or a multiple of 4)"))
    builders = {"sylvester": _sylvester, "paley1": _paley1, "paley2": _paley2}
    H = torch.ones(1, 1, dtype=torch.float64)
    for m in factors:
        H = torch.kron(H, builders[_direct_kind(m)](m))
    return H                                                           # [n, n] of +-1


def hadamard_order_supported(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build order n."""
    return n >= 1 and _factorization(n) is not None


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal Hadamard matrix [n, n] (entries +-1/sqrt(n), ``H @ H.T = I``) in `dtype`.

    Raises HadamardError naming n when no construction here reaches n (see the module docstring).
    """
    if not isinstance(n, int) or n < 1:
        raise HadamardError(f"expected a positive integer order, found n={n!r}")
    return (_unnormalized(n) / math.sqrt(n)).to(dtype)


@functools.lru_cache(maxsize=32)
def _block_matrix(block: int) -> Tensor:
    """Cached orthonormal fp64 Hadamard of a block order; internal and never mutated."""
    return hadamard_matrix(block)


def random_signs(n: int, seed: int) -> Tensor:
    """[n] fp64 vector of +-1.0 drawn from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2.0 - 1.0


def rotation_matrix(n: int, *, kind: str = "hadamard", seed: int | None = None) -> Tensor:
    """Orthonormal [n, n] fp64 rotation.

    kind="hadamard": ``hadamard_matrix(n) @ diag(random_signs(n, seed))`` (plain Hadamard when seed is None).
    kind="random": Haar-random orthogonal matrix, QR of a Gaussian drawn from a generator seeded with
    `seed` (0 when None, so the result is always reproducible), with R's diagonal signs folded into Q.
    """
    if kind == "hadamard":
        H = hadamard_matrix(n)
        return H if seed is None else H * random_signs(n, seed)[None, :]
    if kind == "random":
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        G = torch.randn(n, n, generator=g, dtype=torch.float64)
        Q, R = torch.linalg.qr(G)
        d = torch.sign(torch.diagonal(R))
        d[d == 0] = 1.0
        return Q * d[None, :]
    raise ValueError(f"expected a rotation kind in {ROTATION_KINDS}, found {kind!r}")


def _check_block(n: int, block: int, signs: Tensor | None) -> None:
    if block < 1 or n % block:
        raise ValueError(f"expected a last dimension divisible by the block size {block}, found {n}")
    if signs is not None and signs.shape != (n,):
        raise ValueError(f"expected signs of shape ({n},), found {tuple(signs.shape)}")


def block_hadamard(x: Tensor, block: int, signs: Tensor | None = None) -> Tensor:
    """Apply ``M = blockdiag(H_b diag(s_1), H_b diag(s_2), ...)`` to the last dim: ``y = x @ M.T``.

    x: [..., n] float, n divisible by `block`; signs: optional [n] of +-1 (s_k is its k-th chunk).
    Computed as ``(x * signs).reshape(..., n/b, b) @ H_b.T`` in x's dtype; returns [..., n], x's dtype.
    """
    n = x.shape[-1]
    _check_block(n, block, signs)
    Hb = _block_matrix(block).to(dtype=x.dtype, device=x.device)      # [b, b]
    if signs is not None:
        x = x * signs.to(dtype=x.dtype, device=x.device)
    y = x.reshape(*x.shape[:-1], n // block, block) @ Hb.T             # [..., n/b, b]
    return y.reshape(x.shape)


def block_hadamard_matrix(n: int, block: int, signs: Tensor | None = None) -> Tensor:
    """The [n, n] fp64 matrix M applied by :func:`block_hadamard` (``y = x @ M.T``)."""
    _check_block(n, block, signs)
    M = torch.kron(torch.eye(n // block, dtype=torch.float64), hadamard_matrix(block))  # [n, n]
    return M if signs is None else M * signs.to(torch.float64)[None, :]
