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
    """Sᵀ's CSR structure for codes `indices` (n, k): entries grouped by latent."""

    crow: Tensor  # (width + 1,) int64: latent i's entries are order[crow[i]:crow[i+1]]
    tokens: Tensor  # (n·k,) int64: the token of each sorted entry
    order: Tensor  # (n·k,) int64: position of each sorted entry in indices.flatten()
    counts: Tensor  # (width,) int64: entries per latent
    shape: tuple[int, int]  # (width, n)


def transpose(indices: Tensor, width: int) -> Transposed:
    """Sort the entries of k-sparse codes by latent (stable, so the result is deterministic)."""
    n, k = indices.shape
    flat = indices.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=width)
    crow = torch.zeros(width + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return Transposed(crow, torch.div(order, k, rounding_mode="floor"), order, counts, (width, n))


def transposed_matmul(t: Transposed, values: Tensor, D: Tensor) -> Tensor:
    """Sᵀ D for codes with these values (n, k) (pattern `t`) and a dense D (n, d) -> (width, d)."""
    S_t = torch.sparse_csr_tensor(t.crow, t.tokens, values.reshape(-1)[t.order], t.shape, check_invariants=False)
    return S_t @ D


def pattern_dots(indices: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """out[i, j] = A[i] · B[indices[i, j]]  (n, k), without the dense A Bᵀ (n, width)."""
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=indices.device)
    # beta=0 still reads S's values (0 · NaN is NaN), so they must be finite: zeros.
    S = torch.sparse_csr_tensor(crow, indices.reshape(-1), A.new_zeros(n * k), (n, B.shape[0]), check_invariants=False)
    return torch.sparse.sampled_addmm(S, A, B.t(), beta=0.0).values().view(n, k)


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
