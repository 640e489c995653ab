"""Kronecker-factored layers: W = sum_k A_k ⊗ B_k, applied without ever forming W.

Convention (docs/architecture.md, "The Kronecker convention"): W is (out, in) as in nn.Linear,
A: (r, m1, n1), B: (r, m2, n2), out = m1*m2, in = n1*n2,
W[i1*m2 + i2, j1*n2 + j2] = sum_k A[k, i1, j1] * B[k, i2, j2].
Forward: X = x.reshape(..., n1, n2), Y = sum_k A_k @ X @ B_k.T, y = Y.reshape(..., m1*m2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kninfer.errors import KninferError


def check_positive(**values: object) -> None:
    """Raise a one-line error unless every value is a positive integer (True and 2.0 are not)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KninferError(f"{name} must be a positive integer, got {value!r}")


def check_divides(out_features: int, in_features: int, m1: int, n1: int, m2: int, n2: int) -> None:
    """Raise a one-line error unless the factor shapes are positive integers with (m1*m2, n1*n2) == (out, in)."""
    check_positive(m1=m1, n1=n1, m2=m2, n2=n2)
    if m1 * m2 != out_features or n1 * n2 != in_features:
        raise KninferError(
            f"factor shapes A ({m1}, {n1}) ⊗ B ({m2}, {n2}) give a ({m1 * m2}, {n1 * n2}) weight, "
            f"expected ({out_features}, {in_features})"
        )


def check_rank(rank: int, m1: int, n1: int, m2: int, n2: int) -> None:
    """Raise a one-line error unless 1 <= rank <= min(m1*n1, m2*n2): more Kronecker terms add nothing."""
    check_positive(rank=rank)
    if rank > min(m1 * n1, m2 * n2):
        raise KninferError(f"rank {rank} must be between 1 and {min(m1 * n1, m2 * n2)} for these factor shapes")


def rearrange(W: torch.Tensor, m1: int, n1: int, m2: int, n2: int) -> torch.Tensor:
    """Van Loan's R: R[i1*n1 + j1, i2*n2 + j2] = W[i1*m2 + i2, j1*n2 + j2], so A ⊗ B = vec(A) vec(B)ᵀ."""
    return W.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def kron_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """sum_k A_k ⊗ B_k as a dense (m1*m2, n1*n2) matrix: the init error, `--dense` export and tests."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    return torch.einsum("kac,kbd->abcd", A, B).reshape(m1 * m2, n1 * n2)


def nearest_kronecker(
    W: torch.Tensor, m1: int, n1: int, m2: int, n2: int, rank: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r sum_k A_k ⊗ B_k to W in Frobenius norm (Van Loan and Pitsianis): top-r SVD of R."""
    check_divides(*W.shape, m1, n1, m2, n2)
    check_rank(rank, m1, n1, m2, n2)
    R = rearrange(W.detach().double(), m1, n1, m2, n2)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    root = S[:rank].sqrt()
    A = (U[:, :rank] * root).T.reshape(rank, m1, n1)
    B = (Vh[:rank].T * root).T.reshape(rank, m2, n2)
    return A.to(W.dtype), B.to(W.dtype)


def relative_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """‖W - sum_k A_k ⊗ B_k‖_F / ‖W‖_F."""
    W = W.detach().double()
    return float(torch.linalg.norm(W - kron_sum(A.detach().double(), B.detach().double())) / torch.linalg.norm(W))


def rescale_to_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Krony-PT's modified Van Loan: scale B so that ‖A ⊗ B‖_F = ‖W‖_F; returns the new B."""
    approx = torch.linalg.norm(kron_sum(A.double(), B.double()))
    return (B.double() * (torch.linalg.norm(W.double()) / approx)).to(B.dtype)


def pruned_kronecker(
    W: torch.Tensor, m1: int, n1: int, m2: int, n2: int, rank: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruning-based init (our reading of Krony-PT): A keeps one entry per (m2, n2) block, B is flat.

    A_k[i1, j1] = W[i1*m2 + k, j1*n2 + k] (the k-th diagonal entry of each block, k < rank) and B_k = 1,
    then B is rescaled so that ‖sum_k A_k ⊗ B_k‖_F = ‖W‖_F.
    """
    check_divides(*W.shape, m1, n1, m2, n2)
    blocks = W.detach().reshape(m1, m2, n1, n2)
    A = torch.stack([blocks[:, k % m2, :, k % n2] for k in range(rank)])
    B = torch.ones(rank, m2, n2, dtype=W.dtype) / rank
    return A, rescale_to_norm(W, A, B)


@dataclass(frozen=True)
class FactorShape:
    """The factor shapes of one Kronecker layer: A (rank, m1, n1), B (rank, m2, n2)."""

    m1: int
    n1: int
    m2: int
    n2: int
    rank: int = 1

    @property
    def params(self) -> int:
        """Parameters of A and B."""
        return self.rank * (self.m1 * self.n1 + self.m2 * self.n2)

    @property
    def macs(self) -> int:
        """Multiply-adds per token of the cheaper matmul order."""
        return self.rank * min(matmul_costs(self.m1, self.n1, self.m2, self.n2))

    def transposed(self) -> FactorShape:
        """The shapes of the transposed weight, Aᵀ ⊗ Bᵀ."""
        return FactorShape(self.n1, self.m1, self.n2, self.m2, self.rank)


def matmul_costs(m1: int, n1: int, m2: int, n2: int) -> tuple[int, int]:
    """Multiply-adds per token and per rank of (A @ X) @ Bᵀ and of A @ (X @ Bᵀ)."""
    return m1 * n1 * n2 + m1 * n2 * m2, n1 * n2 * m2 + m1 * n1 * m2


def factor_shapes(out_features: int, in_features: int, rank: int = 1) -> list[FactorShape]:
    """Every non-trivial (m1, n1, m2, n2) for an (out, in) weight, smallest first."""
    check_positive(out_features=out_features, in_features=in_features, rank=rank)
    shapes = [FactorShape(out_features // m2, in_features // n2, m2, n2, rank)
              for m2 in _divisors(out_features) for n2 in _divisors(in_features)
              if (out_features // m2) * (in_features // n2) > 1 and m2 * n2 > 1]
    return sorted(shapes, key=lambda s: (s.params, s.macs))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


class _ReshapeTail(torch.autograd.Function):
    """Export-time reshape of the trailing dims: one ONNX Reshape with the constant target [0, ..., 0, *tail]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lead: int, tail: tuple[int, ...]) -> torch.Tensor:
        return x.reshape(*x.shape[:lead], *tail)

    @staticmethod
    def symbolic(g, x, lead: int, tail: tuple[int, ...]):
        target = [0] * lead + ([-1, *tail[1:]] if -1 not in tail else list(tail))  # torch's exporter wants a -1
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(target)))


def reshape_tail(x: torch.Tensor, count: int, tail: tuple[int, ...]) -> torch.Tensor:
    """Reshape the last `count` dims of x to `tail`, keeping the leading ones.

    Under ONNX export the target is a constant whose 0s copy the leading dims, instead of the
    Shape -> Gather -> Concat chain that `x.shape` would trace to.
    """
    lead = x.dim() - count
    if torch.onnx.is_in_onnx_export():
        return _ReshapeTail.apply(x, lead, tuple(tail))
    return x.reshape(*x.shape[:lead], *tail)


class KroneckerLinear(nn.Module):
    """y = (sum_k A_k ⊗ B_k) x + bias, computed as sum_k A_k X B_kᵀ in a form chosen by shape (see forward)."""

    def __init__(
        self, in_features: int, out_features: int, m1: int, n1: int, m2: int, n2: int,
        rank: int = 1, bias: bool = True,
    ) -> None:
        super().__init__()
        check_divides(out_features, in_features, m1, n1, m2, n2)
        check_positive(rank=rank)
        self.in_features, self.out_features = in_features, out_features
        self.m1, self.n1, self.m2, self.n2, self.rank = m1, n1, m2, n2, rank
        self.A = nn.Parameter(torch.empty(rank, m1, n1))
        self.B = nn.Parameter(torch.empty(rank, m2, n2))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Entries of W with standard deviation `std`, as GPT-2 initialises its dense weights."""
        factor_std = math.sqrt(std) / self.rank**0.25
        nn.init.normal_(self.A, std=factor_std)
        nn.init.normal_(self.B, std=factor_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, m1: int, n1: int, m2: int, n2: int,
        rank: int = 1,
    ) -> KroneckerLinear:
        """The nearest Kronecker layer to nn.Linear-style `weight` (out, in) and `bias`."""
        layer = cls(weight.shape[1], weight.shape[0], m1, n1, m2, n2, rank, bias is not None).to(weight.dtype)
        layer.load_dense(weight, bias)
        return layer

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, bias: torch.Tensor | None, init: str = "van-loan") -> float:
        """Set the factors from a dense (out, in) weight; returns the relative Frobenius error."""
        A, B = INITS[init](weight, self.m1, self.n1, self.m2, self.n2, self.rank)
        self.A.copy_(A)
        self.B.copy_(B)
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias)
        return relative_error(weight, A, B)

    def to_dense(self) -> torch.Tensor:
        """The (out, in) weight this layer applies."""
        return kron_sum(self.A, self.B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every factor is MatMul's right-hand operand (one GEMM over all tokens in onnxruntime); the
        # (k, i, j) permutations below touch parameters only and fold into constants at export.
        r, m1, n1, m2, n2 = self.rank, self.m1, self.n1, self.m2, self.n2
        if n2 == 1:  # B (m2, 1): y = x @ Aᵀ, then an inner-dimension-r MatMul with B
            z = torch.matmul(x, self.A.permute(2, 1, 0).reshape(n1, m1 * r))  # column i1*r + k
            Y = torch.matmul(reshape_tail(z, 1, (m1, r)), self.B[:, :, 0])  # (..., m1, m2)
        elif m2 == 1:  # B (1, n2): contract n2 first, then x' @ Aᵀ over (j1, k)
            Z = torch.matmul(reshape_tail(x, 1, (n1, n2)), self.B[:, 0, :].T)  # (..., n1, r)
            A_t = self.A.permute(2, 0, 1).reshape(n1 * r, m1)  # row j1*r + k
            return self._add_bias(torch.matmul(reshape_tail(Z, 2, (n1 * r,)), A_t))
        elif r == 1:  # general shapes, rank 1: X Bᵀ, then A from the left as one small GEMM per token.
            # A on the left breaks the right-hand-weight rule, but A is small (fp32 in int8 graphs) and this needs
            # no 4-D Transpose: 0.96x the time of the form below at T = 1 and T = 128 (768x3072 layer, ORT).
            Y = torch.matmul(self.A[0], torch.matmul(reshape_tail(x, 1, (n1, n2)), self.B[0].T))  # (..., m1, m2)
        else:  # general shapes, rank r: X Bᵀ, then Aᵀ on the transposed per-token intermediate; 2-D weights only
            # (3-D weights would avoid the Transposes, no faster at r = 2, but int8 per-channel rejects them)
            Z = torch.matmul(reshape_tail(x, 1, (n1, n2)), self.B.permute(2, 1, 0).reshape(n2, m2 * r))
            Z = reshape_tail(Z.transpose(-1, -2), 2, (m2, r * n1))  # row i2, column k*n1 + j1
            Y = torch.matmul(Z, self.A.permute(0, 2, 1).reshape(r * n1, m1)).transpose(-1, -2)  # (..., m1, m2)
        return self._add_bias(reshape_tail(Y, 2, (m1 * m2,)))

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, A=({self.m1}, {self.n1}), "
            f"B=({self.m2}, {self.n2}), rank={self.rank}, bias={self.bias is not None}"
        )


class KroneckerEmbedding(nn.Module):
    """Embedding E = sum_k A_k ⊗ B_k with A_k: (vocab, d/f), B_k: (1, f); also the tied LM head.

    A is stored transposed with the rank folded in, `A_t: (d/f * r, vocab)` with row j1*r + k holding
    A_k[:, j1], so that the head's MatMul and the embedding's Gather(axis=1) read one tensor.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, f: int, rank: int = 1) -> None:
        super().__init__()
        check_positive(f=f, rank=rank)
        check_divides(num_embeddings, embedding_dim, num_embeddings, embedding_dim // f, 1, f)
        self.num_embeddings, self.embedding_dim, self.f, self.rank = num_embeddings, embedding_dim, f, rank
        self.A_t = nn.Parameter(torch.empty(embedding_dim // f * rank, num_embeddings))
        self.B = nn.Parameter(torch.empty(rank, f))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        factor_std = math.sqrt(std) / self.rank**0.25
        nn.init.normal_(self.A_t, std=factor_std)
        nn.init.normal_(self.B, std=factor_std)

    @property
    def A(self) -> torch.Tensor:
        """The factors in the common layout, (r, vocab, d/f)."""
        return self.A_t.reshape(-1, self.rank, self.num_embeddings).permute(1, 2, 0)

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, bias: None = None, init: str = "van-loan") -> float:
        """Set the factors from a dense (vocab, d) table (an embedding has no bias: `bias` is None, as
        KroneckerLinear's signature has it); returns the relative Frobenius error."""
        vocab, d = weight.shape
        A, B = INITS[init](weight, vocab, d // self.f, 1, self.f, self.rank)
        self.A_t.copy_(A.permute(2, 0, 1).reshape(-1, vocab))
        self.B.copy_(B[:, 0, :])
        return relative_error(weight, A, B[:, :1, :])

    def to_dense(self) -> torch.Tensor:
        """The (vocab, d) table this layer represents."""
        return kron_sum(self.A, self.B.unsqueeze(1))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.A_t.index_select(1, input_ids.reshape(-1)).T  # Gather(axis=1) on the shared A_t: (N, d/f * r)
        table = torch.matmul(rows.reshape(-1, self.embedding_dim // self.f, self.rank), self.B)  # (N, d/f, f)
        return table.reshape(*input_ids.shape, self.embedding_dim)

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head: logits = sum_k A_k @ (H @ B_kᵀ) with H = hidden.reshape(..., d/f, f)."""
        projected = torch.matmul(reshape_tail(hidden, 1, (-1, self.f)), self.B.T)  # (..., d/f, r)
        return torch.matmul(reshape_tail(projected, 2, (-1,)), self.A_t)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, d={self.embedding_dim}, f={self.f}, rank={self.rank}"


def rescaled_kronecker(
    W: torch.Tensor, m1: int, n1: int, m2: int, n2: int, rank: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Krony-PT's modified Van Loan: the nearest Kronecker factors with B rescaled to W's norm."""
    A, B = nearest_kronecker(W, m1, n1, m2, n2, rank)
    return A, rescale_to_norm(W, A, B)


INITS = {"van-loan": nearest_kronecker, "van-loan-rescaled": rescaled_kronecker, "pruning": pruned_kronecker}
