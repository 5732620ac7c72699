"""saekit.dictionaries.sparse: CSR products of k-sparse codes against dense references."""

from __future__ import annotations

import pytest
import torch

from saekit.dictionaries.sae import sparse_decode_bag, sparse_decode_csr, sparse_decode_dense
from saekit.dictionaries.sparse import SparseDecode, pattern_dots, transpose, transposed_matmul


def _codes(n=300, width=50, k=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(n, width - 10, generator=g).argsort(-1)[:, :k]  # k distinct latents per row; the last 10 unused
    indices[:40] = indices[:40] % 3  # crowd some rows onto three latents (repeats within a latent's column)
    indices[:40] += torch.arange(k) * 3
    values = torch.randn(n, k, generator=g, dtype=dtype)
    return values, indices


def _dense(values, indices, width):
    return torch.zeros(values.shape[0], width, dtype=values.dtype).scatter_(1, indices, values)


@pytest.mark.parametrize("k", [1, 6])
def test_transposed_matmul_equals_dense(k):
    values, indices = _codes(k=k)
    D = torch.randn(300, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = transpose(indices, 50)
    counts = t.crow.diff()
    assert counts.sum() == indices.numel() and int((counts == 0).sum()) > 0  # some latents unused
    torch.testing.assert_close(transposed_matmul(t, values, D), _dense(values, indices, 50).t() @ D)
    # the same structure serves other values with the same pattern
    torch.testing.assert_close(transposed_matmul(t, values * values, D), _dense(values * values, indices, 50).t() @ D)


def test_transpose_is_deterministic_and_latent_major():
    _, indices = _codes()
    a, b = transpose(indices, 50), transpose(indices, 50)
    assert torch.equal(a.order, b.order) and torch.equal(a.tokens, b.tokens)
    sorted_latents = indices.reshape(-1)[a.order]
    assert bool((sorted_latents[1:] >= sorted_latents[:-1]).all())
    assert torch.equal(a.crow.diff(), torch.bincount(indices.reshape(-1), minlength=50))


def test_pattern_dots_equals_gather_of_dense_product():
    _, indices = _codes(dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(300, 9, generator=g), torch.randn(50, 9, generator=g)
    torch.testing.assert_close(pattern_dots(indices, A, B), (A @ B.t()).gather(1, indices))


def test_sparse_decode_gradients_equal_dense_and_bag():
    values, indices = _codes()
    W = torch.randn(50, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    w_out = torch.randn(300, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    results = []
    for fn in (sparse_decode_dense, sparse_decode_bag, sparse_decode_csr, SparseDecode.apply):
        vp, Wp = values.clone().requires_grad_(), W.clone().requires_grad_()
        y = fn(vp, indices, Wp)
        results.append((y.detach(), *torch.autograd.grad((y * w_out).sum(), (vp, Wp))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)


def test_sparse_decode_gradcheck():
    values, indices = _codes(n=50, width=17, k=3)
    W = torch.randn(17, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: SparseDecode.apply(v, indices, w), (values.requires_grad_(), W))


def test_sparse_decode_backward_is_bitwise_repeatable():
    values, indices = _codes(n=2000, width=64, k=8, dtype=torch.float32)
    W = torch.randn(64, 16, requires_grad=True)
    grads = [torch.autograd.grad(SparseDecode.apply(values, indices, W).square().sum(), W)[0] for _ in range(2)]
    assert torch.equal(*grads)
