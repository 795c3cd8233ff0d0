"""Hadamard matrices and block rotations: orthonormality, entries, errors, block structure, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from mixq.algorithms.hadamard import (HadamardError, block_hadamard, block_hadamard_matrix, hadamard_matrix,
                                      random_signs, rotation_matrix)

ORDERS = [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 60, 64, 96, 128, 576, 1536]


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_orthonormal_with_pm_entries(n):
    H = hadamard_matrix(n)
    assert H.shape == (n, n) and H.dtype == torch.float64
    assert torch.allclose(H @ H.T, _eye(n), atol=1e-12)
    # entries are exactly +-1 / sqrt(n) (as integers after scaling)
    S = H * math.sqrt(n)
    assert torch.equal(S.round().abs(), torch.ones(n, n, dtype=torch.float64))
    assert (S - S.round()).abs().max() < 1e-9


def test_hadamard_dtype_and_paley_kinds():
    H = hadamard_matrix(12, dtype=torch.float32)
    assert H.dtype == torch.float32
    assert torch.allclose(H @ H.T, torch.eye(12), atol=1e-6)
    # 28 = 2 * (13 + 1) only via Paley II; 20 = 19 + 1 via Paley I: both are not powers of two
    for n in (20, 28):
        H = hadamard_matrix(n) * math.sqrt(n)
        assert torch.allclose(H @ H.T, n * _eye(n))


@pytest.mark.parametrize("n", [3, 6, 10, 18])
def test_hadamard_impossible_orders_raise(n):
    with pytest.raises(HadamardError, match=rf"n={n}\b.*multiple of 4"):
        hadamard_matrix(n)


def test_hadamard_unconstructed_order_names_supported_orders():
    # 92 exists (Williamson) but is not reached by Sylvester / Paley / Kronecker products
    with pytest.raises(HadamardError, match=r"n=92\b.*2\^k.*p\+1.*2\(p\+1\)"):
        hadamard_matrix(92)
    with pytest.raises(HadamardError, match="positive"):
        hadamard_matrix(0)
    assert issubclass(HadamardError, ValueError)


def test_random_signs_reproducible():
    a, b, c = random_signs(64, 3), random_signs(64, 3), random_signs(64, 4)
    assert a.dtype == torch.float64 and a.shape == (64,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("n", [12, 64, 96])
def test_rotation_matrix_orthonormal(kind, n):
    Q = rotation_matrix(n, kind=kind, seed=7)
    assert Q.dtype == torch.float64 and Q.shape == (n, n)
    assert torch.allclose(Q @ Q.T, _eye(n), atol=1e-12)
    assert torch.equal(Q, rotation_matrix(n, kind=kind, seed=7))
    assert not torch.equal(Q, rotation_matrix(n, kind=kind, seed=8))


def test_rotation_matrix_hadamard_signs_and_bad_kind():
    Q = rotation_matrix(16, seed=5)
    assert torch.equal(Q, hadamard_matrix(16) @ torch.diag(random_signs(16, 5)))
    assert torch.equal(rotation_matrix(16), hadamard_matrix(16))
    with pytest.raises(ValueError, match="hadamard.*random.*'givens'"):
        rotation_matrix(16, kind="givens")


@pytest.mark.parametrize("n,block", [(48, 12), (64, 16), (64, 64), (96, 4)])
@pytest.mark.parametrize("with_signs", [False, True])
def test_block_hadamard_matches_block_diag_oracle(n, block, with_signs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, n, generator=g)                              # fp32
    signs = random_signs(n, 11) if with_signs else None
    H = hadamard_matrix(block)
    s = signs if with_signs else torch.ones(n, dtype=torch.float64)
    oracle = torch.block_diag(*[H @ torch.diag(s[i:i + block]) for i in range(0, n, block)])
    M = block_hadamard_matrix(n, block, signs)
    assert torch.allclose(M, oracle, atol=1e-15)
    y = block_hadamard(x, block, signs)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.allclose(y.double(), x.double() @ oracle.T, atol=1e-5)
    # orthonormal: norms preserved, and the transpose undoes it
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert torch.allclose((y.double() @ M), x.double(), atol=1e-5)


def test_block_hadamard_bad_shapes():
    with pytest.raises(ValueError, match="divisible by the block size 16, found 40"):
        block_hadamard(torch.zeros(2, 40), 16)
    with pytest.raises(ValueError, match=r"signs of shape \(32,\)"):
        block_hadamard(torch.zeros(2, 32), 16, torch.ones(16))
    with pytest.raises(HadamardError, match="n=6"):
        block_hadamard(torch.zeros(2, 36), 6)
