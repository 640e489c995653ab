"""Kronecker factors fitted to a layer's outputs on calibration inputs, not to its weight.

With inputs x of second moment C = E[x xᵀ] (in, in), the output error of K = sum_k A_k ⊗ B_k in place of W is
E‖(W - K) x‖² = tr((W - K) C (W - K)ᵀ). Two steps minimise it:
1. a start: whitened Van Loan, C ≈ C1 ⊗ C2 (its own nearest Kronecker product), so that with S = C1^½ ⊗ C2^½
   the error is ‖(W - K) S‖²_F and (A ⊗ B) S = (A C1^½) ⊗ (B C2^½): Van Loan on W S, then the roots are undone.
   Exact when C is a Kronecker product; for a low-rank shape (n1 = 1) it is the activation-whitened SVD. Plain
   Van Loan is the other start; the one of smaller output error is kept.
2. alternating least squares on the exact error: with B fixed the error is quadratic in A and every row block of
   A shares one (rank·n1)² normal matrix, so each half-step is one small solve; the error never rises.
Factors follow kron.py's convention; C is accumulated in float64 by the caller (`second_moment`).
"""

from __future__ import annotations

import torch

from kninfer.kron import FactorShape, check_divides, check_rank, kron_sum, nearest_kronecker, rearrange

RIDGE = 1e-6  # relative to the mean diagonal: keeps the normal equations of unused directions solvable


def second_moment(inputs: torch.Tensor) -> torch.Tensor:
    """Σ x xᵀ over the rows of `inputs` (..., in), in float64: add these up over batches, divide by the count."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return x.T @ x


def output_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> float:
    """tr(ΔCΔᵀ) / tr(WCWᵀ) with Δ = W - sum_k A_k ⊗ B_k: the relative output error on inputs of second moment C."""
    W, C = W.detach().double(), C.double()
    delta = W - kron_sum(A.detach().double(), B.detach().double())
    return float(((delta @ C) * delta).sum() / ((W @ C) * W).sum())


def fit_kronecker(W: torch.Tensor, C: torch.Tensor, shape: FactorShape,
                  sweeps: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors A (rank, m1, n1), B (rank, m2, n2) minimising the output error of W (out, in) on inputs of second
    moment C (in, in): whitened Van Loan, then `sweeps` rounds of alternating least squares."""
    m1, n1, m2, n2, rank = shape.m1, shape.n1, shape.m2, shape.n2, shape.rank
    check_divides(*W.shape, m1, n1, m2, n2)
    check_rank(rank, m1, n1, m2, n2)
    W64, C64 = W.detach().double(), _ridged(C.double())
    starts = (_whitened_van_loan(W64, C64, shape), nearest_kronecker(W64, m1, n1, m2, n2, rank))
    A, B = min(starts, key=lambda start: output_error(W64, *start, C64))  # ALS keeps to the basin it starts in
    if min(n1, n2) > 1:  # with n1 = 1 or n2 = 1 whitening is exact: ALS would not move
        WC = (W64 @ C64).reshape(m1, m2, n1, n2)
        C4 = C64.reshape(n1, n2, n1, n2)
        for _ in range(sweeps):
            A = _solve_a(WC, C4, B)
            B = _solve_b(WC, C4, A)
    return A.to(W.dtype), B.to(W.dtype)


def _ridged(C: torch.Tensor) -> torch.Tensor:
    C = (C + C.T) / 2
    return C + RIDGE * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)


def whitened_spectrum(W: torch.Tensor, C: torch.Tensor, shape: FactorShape) -> torch.Tensor:
    """Singular values of Van Loan's rearrangement of the input-whitened W: rank r leaves out those after the r-th,
    so 1 - cumsum(σ²)/Σσ² estimates the relative output error of each rank (exact when C is a Kronecker product)."""
    whitened, _, _ = _whitened(W.detach().double(), _ridged(C.double()), shape.n1, shape.n2)
    return torch.linalg.svdvals(rearrange(whitened, shape.m1, shape.n1, shape.m2, shape.n2))


def _whitened_van_loan(W: torch.Tensor, C: torch.Tensor, shape: FactorShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Van Loan on W (C1^½ ⊗ C2^½) with C1 ⊗ C2 the nearest Kronecker product to C, the roots then undone."""
    whitened, S1_inv, S2_inv = _whitened(W, C, shape.n1, shape.n2)
    A, B = nearest_kronecker(whitened, shape.m1, shape.n1, shape.m2, shape.n2, shape.rank)
    return A @ S1_inv, B @ S2_inv


def _whitened(W: torch.Tensor, C: torch.Tensor, n1: int, n2: int) -> tuple[torch.Tensor, ...]:
    """W (C1^½ ⊗ C2^½) for C1 ⊗ C2 the nearest Kronecker product to C, and the inverse roots C1^-½, C2^-½."""
    if n1 == 1 or n2 == 1:  # one factor is 1 x 1: C itself is the other, exactly
        one = torch.ones(1, 1, 1, dtype=C.dtype)
        C1, C2 = (one, C[None]) if n1 == 1 else (C[None], one)
    else:
        C1, C2 = nearest_kronecker(C, n1, n1, n2, n2)
    (S1, S1_inv), (S2, S2_inv) = (_sqrt_and_inverse(c[0] * torch.sign(c[0].trace())) for c in (C1, C2))
    # (S1 ⊗ S2)[(a, b), (c, d)] = S1[a, c] S2[b, d]
    whitened = torch.matmul(S1.T, W.reshape(-1, n1, n2) @ S2).reshape(W.shape)
    return whitened, S1_inv, S2_inv


def _sqrt_and_inverse(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric square root of a PSD matrix and its inverse, eigenvalues floored at RIDGE × their mean."""
    values, vectors = torch.linalg.eigh((C + C.T) / 2)
    values = values.clamp_min(RIDGE * values.clamp_min(0).mean().item() + 1e-30)
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


def _solve_a(WC: torch.Tensor, C4: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The A minimising the output error for fixed B: A (m1, r·n1) G = R, one normal matrix G for every row.
    With the roles swapped (`_solve_b`) the same equations give B."""
    rank, n1 = B.shape[0], C4.shape[0]
    BB = torch.einsum("lia,kib->lkab", B, B)
    G = torch.einsum("lkab,xayb->lxky", BB, C4).reshape(rank * n1, rank * n1)
    R = torch.einsum("pqyb,kqb->pky", WC, B).reshape(WC.shape[0], rank * n1)
    return _solve(G, R).reshape(-1, rank, n1).transpose(0, 1)


def _solve_b(WC: torch.Tensor, C4: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The B minimising the output error for fixed A: A ⊗ B and B ⊗ A hold the same entries with the row and column
    index pairs swapped, so B is `_solve_a`'s answer on the swapped WC and C4."""
    return _solve_a(WC.permute(1, 0, 3, 2), C4.permute(1, 0, 3, 2), A)


def _solve(G: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """X with X G = R for a symmetric PSD G, ridged so that a factor direction no input reaches stays finite."""
    G = (G + G.T) / 2 + RIDGE * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
    return torch.linalg.solve(G, R.T).T
