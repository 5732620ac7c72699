"""saekit.dictionaries.kernels (numba) against torch: row top-k, ReLU codes as CSR and the products on them."""

from __future__ import annotations

import pytest
import torch

from saekit.dictionaries.kernels import csr_matmul, csr_t_matmul, relu_csr, sampled_dots, topk_indices


def _same_selection(x: torch.Tensor, k: int) -> torch.Tensor:
    idx = topk_indices(x, k)
    assert idx.shape == (x.shape[0], k) and idx.dtype == torch.int64
    assert all(len(set(r.tolist())) == k for r in idx)  # k distinct columns per row
    got = x.gather(1, idx).sort(-1).values
    ref = x.topk(k, dim=-1).values.sort(-1).values
    assert torch.equal(got.nan_to_num(nan=7.5), ref.nan_to_num(nan=7.5))
    return idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width,k", [(512, 16), (100, 7), (33, 1), (20, 20), (4096, 32), (512, 64), (4096, 128), (64, 63)])
def test_random_rows(width, k, dtype):
    x = torch.randn(300, width, generator=torch.Generator().manual_seed(width + k), dtype=dtype)
    _same_selection(x, k)


def test_ties_infinities_and_constant_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (200, 64), generator=g).float()  # many ties at the cut
    x[0] = 1.0  # constant row: any k columns
    x[1] = -torch.inf
    x[1, 7] = 0.0
    x[2, :40] = torch.inf
    x[3, ::2] = -torch.inf
    _same_selection(x, 5)
    _same_selection(x, 32)


def test_nan_rows_follow_torch():
    """torch.topk ranks NaN above every number; rows with a NaN get exactly torch's selection."""
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    x[3, 10] = torch.nan
    x[4, :] = torch.nan
    x[5, ::3] = torch.nan
    idx = _same_selection(x, 8)
    assert 10 in idx[3].tolist()
    for r in (3, 4, 5):
        assert torch.equal(idx[r].sort().values, x[r].topk(8, sorted=False).indices.sort().values)


def test_threads_and_noncontiguous_input():
    x = torch.randn(2000, 300, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = topk_indices(x, 12)
        torch.set_num_threads(1)
        b = topk_indices(x, 12)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)  # splitting rows across threads changes nothing
    _same_selection(x[:, ::2], 6)  # a strided view is copied, not misread


# --- ReLU codes as CSR and the products on them ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_csr_and_products_equal_dense(dtype):
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(700, 90, generator=g, dtype=dtype) - 1.2
    pre[5] = -1.0  # a row with no active latent
    nnz, (crow, cols, vals) = relu_csr(pre)
    f = pre.relu()
    assert nnz == int((f > 0).sum()) and crow[-1] == nnz
    assert torch.equal(torch.sparse_csr_tensor(crow, cols, vals, f.shape).to_dense(), f)
    W = torch.randn(90, 17, generator=g, dtype=dtype)
    D = torch.randn(700, 17, generator=g, dtype=dtype)
    torch.testing.assert_close(csr_matmul(crow, cols, vals, W), f @ W)
    torch.testing.assert_close(csr_t_matmul(crow, cols, vals, D, 90), f.t() @ D)
    rows = torch.arange(700).repeat_interleave(crow.diff())
    torch.testing.assert_close(sampled_dots(crow, cols, D, W), (D @ W.t())[rows, cols])


def test_relu_csr_density_limit_and_nan():
    pre = torch.randn(300, 40, generator=torch.Generator().manual_seed(4))
    nnz, csr = relu_csr(pre, max_density=0.1)  # about half is > 0
    assert csr is None and nnz == int((pre > 0).sum())
    pre[7, 3] = torch.nan
    assert relu_csr(pre) == (None, None)  # the caller keeps the dense path, where NaN propagates
