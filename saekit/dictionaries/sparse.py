"""k-sparse codes as CSR matrices: the gradients of TopK-style steps without dense (n, d_dict) work.

A batch of codes with k entries per token (values, indices: (n, k)) is the sparse matrix
S (n, d_dict).  Its training step needs three products with it:

    x̂ = S W_dec              forward decode: `F.embedding_bag` (k rows per token)
    ∂values = rows of ∂x̂ W_decᵀ at S's pattern     a sampled product: `torch.sparse.sampled_addmm`
    Sᵀ D   (d_dict, d)        ∂W_dec (D = ∂x̂) and ∂W_encᵀ (D = x_n): CSR of Sᵀ times D

Sᵀ's CSR needs the entries sorted by latent: one stable argsort of the n·k indices
(`transpose`), shared by every Sᵀ product of a step.  On one CPU thread at n 4096,
d_dict 512, k 16, d 128 an Sᵀ D product costs ~1.4 ms (+1.1 ms for the sort) against
~6 ms for `embedding_bag`'s own W_dec backward and ~8.6 ms for scattering into a dense
(n, d_dict) matrix and multiplying (benchmarks/README.md, "Speed, third pass").
The stable sort keeps the summation order fixed, so resumed runs stay bitwise equal.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# torch warns once per process that CSR support is "beta"; the products used here are tested
# against dense references (tests/test_sparse.py), and the structures are valid by construction
# (so invariant checks are off).
warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")


class Transposed(NamedTuple):
    """Sᵀ's CSR structure: S's entries grouped by latent."""

    crow: Tensor  # (width + 1,) int64: latent i's entries are order[crow[i]:crow[i+1]]
    tokens: Tensor  # (nnz,) int64: the token (row of S) of each sorted entry
    order: Tensor  # (nnz,) int64: position of each sorted entry among S's entries (row-major)
    shape: tuple[int, int]  # (width, n)


def transpose(indices: Tensor, width: int, rows: Tensor | None = None, n: int | None = None) -> Transposed:
    """Sort S's entries by latent (stable, so the result is deterministic).

    S is either k-sparse codes, `indices` (n, k), or a CSR matrix given by its column
    indices `indices` (nnz,), the row of each entry `rows` (nnz,) and its row count `n`.
    """
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    if rows is None:
        n, k = indices.shape
        tokens = torch.div(order, k, rounding_mode="floor")
    else:
        tokens = rows[order]
    crow = torch.zeros(width + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(flat, minlength=width), 0, out=crow[1:])
    return Transposed(crow, tokens, order, (width, n))


def transposed_matmul(t: Transposed, values: Tensor, D: Tensor) -> Tensor:
    """Sᵀ D for S with these values (row-major: (n, k), or (nnz,)) on pattern `t`, D dense (n, d) -> (width, d)."""
    S_t = torch.sparse_csr_tensor(t.crow, t.tokens, values.reshape(-1)[t.order], t.shape, check_invariants=False)
    return S_t @ D


def sampled_dots(crow: Tensor, cols: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """For each entry (i, j) of a CSR pattern (crow, cols) with n rows: A[i] · B[j], (nnz,).

    A sampled product (`torch.sparse.sampled_addmm`): nnz dot products, not the dense A Bᵀ.
    """
    # beta=0 still reads the pattern's values (0 · NaN is NaN), so they must be finite: zeros.
    S = torch.sparse_csr_tensor(crow, cols, A.new_zeros(cols.shape[0]), (A.shape[0], B.shape[0]), check_invariants=False)
    return torch.sparse.sampled_addmm(S, A, B.t(), beta=0.0).values()


def pattern_dots(indices: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """out[i, j] = A[i] · B[indices[i, j]]  (n, k), without the dense A Bᵀ (n, width)."""
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=indices.device)
    return sampled_dots(crow, indices.reshape(-1), A, B).view(n, k)


class SparseDecode(torch.autograd.Function):
    """x̂ = S W_dec for k-sparse codes (values, indices): `embedding_bag` forward, CSR backward.

    Backward: ∂values = `pattern_dots`(∂x̂, W_dec), ∂W_dec = Sᵀ ∂x̂ (`transposed_matmul`);
    `embedding_bag`'s own backward computes the same but scatters per entry (~6 ms, above).
    """

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        ctx.mark_non_differentiable(indices)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        g = g.contiguous()
        g_values = pattern_dots(indices, g, W_dec) if ctx.needs_input_grad[0] else None
        g_W = transposed_matmul(transpose(indices, W_dec.shape[0]), values, g) if ctx.needs_input_grad[2] else None
        return g_values, None, g_W
