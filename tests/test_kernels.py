"""saekit.dictionaries.kernels (numba row top-k) against torch.topk, including its awkward inputs."""

from __future__ import annotations

import pytest
import torch

from saekit.dictionaries.kernels import topk_indices


def _same_selection(x: torch.Tensor, k: int) -> torch.Tensor:
    idx = topk_indices(x, k)
    assert idx.shape == (x.shape[0], k) and idx.dtype == torch.int64
    assert all(len(set(r.tolist())) == k for r in idx)  # k distinct columns per row
    got = x.gather(1, idx).sort(-1).values
    ref = x.topk(k, dim=-1).values.sort(-1).values
    assert torch.equal(got.nan_to_num(nan=7.5), ref.nan_to_num(nan=7.5))
    return idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width,k", [(512, 16), (100, 7), (33, 1), (20, 20), (4096, 32)])
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
