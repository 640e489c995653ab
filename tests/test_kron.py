"""Kronecker core against torch.kron in float64: decomposition, layers, embedding and tied head."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kninfer.errors import KninferError
from kninfer.kron import (
    KroneckerEmbedding,
    KroneckerLinear,
    factor_shapes,
    kron_sum,
    nearest_kronecker,
    pruned_kronecker,
    rearrange,
    relative_error,
    rescaled_kronecker,
)

dims = st.integers(1, 5)


def reference(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """sum_k A_k ⊗ B_k with torch.kron, the independent reference."""
    return sum(torch.kron(a.contiguous(), b.contiguous()) for a, b in zip(A, B, strict=True))


@settings(max_examples=40, deadline=None)
@given(m1=dims, n1=dims, m2=dims, n2=dims, seed=st.integers(0, 2**16))
def test_exact_kronecker_is_recovered(m1, n1, m2, n2, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m1, n1, generator=g, dtype=torch.float64)
    W = torch.kron(A, torch.randn(m2, n2, generator=g, dtype=torch.float64))
    A, B = nearest_kronecker(W, m1, n1, m2, n2)
    assert torch.allclose(reference(A, B), W, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(m1=dims, n1=dims, m2=dims, n2=dims, rank=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_error_is_singular_value_tail_and_optimal(m1, n1, m2, n2, rank, seed):
    rank = min(rank, m1 * n1, m2 * n2)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m1 * m2, n1 * n2, generator=g, dtype=torch.float64)
    A, B = nearest_kronecker(W, m1, n1, m2, n2, rank)
    error = torch.linalg.norm(W - reference(A, B))
    s = torch.linalg.svdvals(rearrange(W, m1, n1, m2, n2))
    assert error == pytest.approx(s[rank:].square().sum().sqrt().item(), abs=1e-9)
    for _ in range(5):  # no random factors do better
        A2 = torch.randn(rank, m1, n1, generator=g, dtype=torch.float64)
        B2 = torch.randn(rank, m2, n2, generator=g, dtype=torch.float64)
        assert torch.linalg.norm(W - reference(A2, B2)) >= error - 1e-9


def test_full_rank_reconstructs():
    W = torch.randn(12, 10, dtype=torch.float64)
    A, B = nearest_kronecker(W, 3, 5, 4, 2, rank=8)
    assert torch.allclose(reference(A, B), W, atol=1e-10)


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(KninferError, match=r"\(12, 10\)"):
        nearest_kronecker(torch.randn(12, 10), 5, 5, 2, 2)
    with pytest.raises(KninferError, match="rank"):
        nearest_kronecker(torch.randn(12, 10), 3, 5, 4, 2, rank=99)


@pytest.mark.parametrize("shape", [(3, 5, 4, 2), (6, 10, 2, 1), (12, 5, 1, 2), (1, 2, 12, 5), (4, 10, 3, 1)])
@pytest.mark.parametrize("rank", [1, 3])
def test_kronecker_linear_equals_dense(shape, rank):
    m1, n1, m2, n2 = shape
    torch.manual_seed(0)
    layer = KroneckerLinear(n1 * n2, m1 * m2, m1, n1, m2, n2, rank=min(rank, m1 * n1, m2 * n2)).double()
    torch.nn.init.normal_(layer.bias)
    W = reference(layer.A.detach(), layer.B.detach())
    assert torch.allclose(layer.to_dense(), W, atol=1e-12)
    for lead in [(7,), (2, 3), (2, 1, 3)]:
        x = torch.randn(*lead, n1 * n2, dtype=torch.float64)
        assert torch.allclose(layer(x), x @ W.T + layer.bias, atol=1e-10)


def test_from_dense_and_bias():
    W, b = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    layer = KroneckerLinear.from_dense(W, b, 4, 6, 2, 1, rank=2)
    assert torch.equal(layer.bias.detach(), b)
    A, B = nearest_kronecker(W, 4, 6, 2, 1, rank=2)
    assert torch.allclose(layer.to_dense(), reference(A, B), atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2])
def test_embedding_and_tied_head_equal_dense(rank):
    torch.manual_seed(0)
    emb = KroneckerEmbedding(50, 12, f=3, rank=rank).double()
    E = reference(emb.A.detach(), emb.B.detach().unsqueeze(1))
    assert E.shape == (50, 12)
    ids = torch.randint(0, 50, (2, 5))
    assert torch.allclose(emb(ids), E[ids], atol=1e-12)
    hidden = torch.randn(2, 5, 12, dtype=torch.float64)
    assert torch.allclose(emb.attend(hidden), hidden @ E.T, atol=1e-10)


def test_embedding_init_recovers_kronecker_table():
    A, b = torch.randn(30, 4, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    E = torch.kron(A, b)
    emb = KroneckerEmbedding(30, 8, f=2).double()
    assert emb.load_dense(E) < 1e-12
    assert torch.allclose(emb.to_dense(), E, atol=1e-12)


def test_rescaled_and_pruned_inits_match_norm():
    W = torch.randn(16, 12, dtype=torch.float64)
    for init in (rescaled_kronecker, pruned_kronecker):
        A, B = init(W, 8, 6, 2, 2)
        assert torch.linalg.norm(kron_sum(A, B)).item() == pytest.approx(torch.linalg.norm(W).item(), rel=1e-9)
    A, B = pruned_kronecker(W, 8, 6, 2, 2)
    assert torch.equal(A[0], W[::2, ::2])


def test_relative_error_of_random_matrix_is_large():
    W = torch.randn(64, 64, dtype=torch.float64)
    assert 0.6 < relative_error(W, *nearest_kronecker(W, 32, 64, 2, 1)) < 1.0


def test_factor_shapes_cover_all_divisors():
    shapes = factor_shapes(12, 8)
    assert len(shapes) == 6 * 4 - 2  # divisor pairs minus the two trivial ones
    for s in shapes:
        assert s.m1 * s.m2 == 12 and s.n1 * s.n2 == 8
        assert s.params == s.m1 * s.n1 + s.m2 * s.n2
        layer = KroneckerLinear(8, 12, s.m1, s.n1, s.m2, s.n2)
        assert sum(p.numel() for p in (layer.A, layer.B)) == s.params
    assert [s.params for s in shapes] == sorted(s.params for s in shapes)
