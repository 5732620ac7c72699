"""k-sparse (TopK) codes as CSR: the products in saekit.dictionaries.kernels and the decoder against dense references."""

from __future__ import annotations

import pytest
import torch

from saekit.dictionaries.fast import sparse_decode_bag, sparse_decode_csr, sparse_decode_dense
from saekit.dictionaries.kernels import SparseDecode, code_rows, csr_t_matmul, sampled_dots


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
def test_transposed_product_equals_dense(k):
    values, indices = _codes(k=k)
    D = torch.randn(300, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    crow, cols = code_rows(indices), indices.reshape(-1)
    counts = torch.bincount(cols, minlength=50)
    assert counts.sum() == indices.numel() and int((counts == 0).sum()) > 0  # some latents unused
    torch.testing.assert_close(csr_t_matmul(crow, cols, values.reshape(-1), D, 50), _dense(values, indices, 50).t() @ D)
    # the same pattern serves other values
    sq = values * values
    torch.testing.assert_close(csr_t_matmul(crow, cols, sq.reshape(-1), D, 50), _dense(sq, indices, 50).t() @ D)


def test_sampled_dots_equal_gather_of_dense_product():
    _, indices = _codes(dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(300, 9, generator=g), torch.randn(50, 9, generator=g)
    got = sampled_dots(code_rows(indices), indices.reshape(-1), A, B).view(indices.shape)
    torch.testing.assert_close(got, (A @ B.t()).gather(1, indices))


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
