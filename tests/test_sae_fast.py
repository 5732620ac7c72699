"""Fast paths in saekit.dictionaries.sae against their eager references (STYLE.md 9)."""

from __future__ import annotations

import pytest
import torch

from saekit.dictionaries import fast
from saekit.dictionaries.base import DictConfig
from saekit.dictionaries.fast import ReluLoss, TopKEncode, batch_topk_candidates, batch_topk_mask, relu_loss_eager, row_topk
from saekit.dictionaries.sae import BatchTopKSAE, ReluSAE, TopKSAE


def _params(n=64, d_in=8, d_dict=24, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xn = torch.randn(n, d_in, generator=g, dtype=dtype) * 2 + 0.5
    ps = [torch.randn(d_in, d_dict, generator=g, dtype=dtype) * 0.3, torch.randn(d_dict, generator=g, dtype=dtype) * 0.2,
          torch.randn(d_dict, d_in, generator=g, dtype=dtype) * 0.3, torch.randn(d_in, generator=g, dtype=dtype) * 0.1]
    return xn, [p.requires_grad_() for p in ps]


@pytest.fixture(params=["dense", "csr"])
def relu_path(request, monkeypatch):
    """ReluLoss's two paths: dense work tensors, or CSR codes (forced by the density threshold)."""
    monkeypatch.setattr(fast, "SPARSE_DENSITY", 1e9 if request.param == "csr" else -1.0)
    assert fast._kernels() is not None  # numba is installed here: the CSR path really runs
    return request.param


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_relu_loss_matches_eager(lam, relu_path):
    """Same loss, terms, Σ_n f, L0 and parameter gradients as plain autograd (float64, some latents inactive)."""
    xn, ps = _params()
    fast = ReluLoss.apply(xn, *ps, lam)
    grads_fast = torch.autograd.grad(fast[0], ps)
    ref = relu_loss_eager(xn, *ps, lam)
    grads_ref = torch.autograd.grad(ref[0], ps)
    assert 0 < float(ref[4]) < ps[0].shape[1]  # some but not all latents active: the mask matters
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.detach(), b.detach())
    for a, b, name in zip(grads_fast, grads_ref, ("W_enc", "b_enc", "W_dec", "b_dec")):
        torch.testing.assert_close(a, b, msg=name)


def test_relu_loss_gradcheck(relu_path):
    """The hand-written backward against finite differences (output scaled by a non-unit upstream gradient)."""
    xn, ps = _params(n=16, d_in=4, d_dict=6, seed=1)
    assert torch.autograd.gradcheck(lambda *p: 1.7 * ReluLoss.apply(xn, *p, 2.0)[0], ps)


def test_relu_loss_workspace_reuse(relu_path):
    """Reused work tensors give the eager gradients on every step, and misuse fails loudly instead of silently.

    Dense path: two forwards on different batches before either backward would overwrite the
    shared f, so autograd's version check must refuse the first backward.  The CSR path copies
    the codes out of the work tensor, so there the first backward stays correct.
    """
    xn, ps = _params()
    xn2 = xn.flip(0) * 0.7
    ws: dict = {}
    for x in (xn, xn2, xn):
        fast = torch.autograd.grad(ReluLoss.apply(x, *ps, 3.0, ws)[0], ps)
        ref = torch.autograd.grad(relu_loss_eager(x, *ps, 3.0)[0], ps)
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b)
    assert set(ws) == ({"f", "h"} if relu_path == "dense" else {"f"})
    first = ReluLoss.apply(xn, *ps, 3.0, ws)[0]
    ReluLoss.apply(xn2, *ps, 3.0, ws)
    if relu_path == "dense":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            first.backward()
    else:
        got = torch.autograd.grad(first, ps)
        for a, b in zip(got, torch.autograd.grad(relu_loss_eager(xn, *ps, 3.0)[0], ps)):
            torch.testing.assert_close(a, b)


def test_relu_loss_csr_path_with_no_active_latent(relu_path):
    """All codes 0 (nnz = 0): the CSR path still gives the eager loss and gradients."""
    xn, ps = _params()
    with torch.no_grad():
        ps[1] -= 100.0
    fast = ReluLoss.apply(xn, *ps, 2.0)
    assert float(fast[4]) == 0.0
    for a, b in zip(torch.autograd.grad(fast[0], ps), torch.autograd.grad(relu_loss_eager(xn, *ps, 2.0)[0], ps)):
        torch.testing.assert_close(a, b)


def test_relu_loss_picks_csr_by_density(monkeypatch):
    """At the default threshold a sparse batch takes the CSR path and a dense one the dense path."""
    seen = []
    real = fast._relu_csr
    monkeypatch.setattr(fast, "_relu_csr", lambda pre: seen.append(real(pre)[1] is not None) or real(pre))
    xn, ps = _params(n=200, d_dict=64)
    ReluLoss.apply(xn, *ps, 1.0)
    with torch.no_grad():
        ps[1] -= 3.0  # most pre-activations now negative
    out = ReluLoss.apply(xn, *ps, 1.0)
    assert float(out[4]) / 64 < fast.SPARSE_DENSITY * 2 / (1 + torch.get_num_threads())
    assert seen == [False, True]


def test_relu_sae_training_forward_uses_both_paths_alike(relu_path):
    """ReluSAE's TrainOutput (fired flags from Σ_n f) equals the eager reference's on float32."""
    d = ReluSAE(DictConfig(kind="relu", d_in=8, d_dict=24, l1=2.0))
    xn = torch.randn(128, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        d.b_enc.copy_(torch.linspace(-5.0, 1.0, 24))  # pre-activations ~ N(0, 1) here: the lowest latents never fire
    out = d.training_forward(xn)
    f = d.encode_n(xn)
    ref = relu_loss_eager(xn, d.W_enc, d.b_enc, d.W_dec, d.b_dec, 2.0)
    torch.testing.assert_close(out.loss, ref[0])
    assert torch.equal(out.fired, (f > 0).any(0)) and not out.fired.all()
    torch.testing.assert_close(out.l0, (f > 0).sum(-1).float().mean())


# --- BatchTopK: candidate search against the full batch-wide top-k -------------------------------

def _dense(values, indices, d_dict):
    return torch.zeros(values.shape[0], d_dict, dtype=values.dtype).scatter(1, indices, values)


def _assert_valid_batch_topk(f, pre, k):
    """f keeps exactly k·n entries (some maybe 0 when fewer are positive), each equal to ReLU(pre) there, none beaten by a dropped one."""
    kept = f > 0
    assert int(kept.sum()) <= k * pre.shape[0]
    torch.testing.assert_close(f[kept], pre[kept], rtol=0, atol=0)
    r = pre.relu()
    if kept.any() and (~kept).any():
        assert r[kept].min() >= r[~kept].max()


@pytest.mark.parametrize("seed", range(4))
def test_batch_topk_candidates_equal_reference_on_random_inputs(seed):
    """No ties: the candidate search keeps exactly the same entries as the full top-(k·n)."""
    g = torch.Generator().manual_seed(seed)
    n, d_dict, k = 64, 256, 3
    pre = torch.randn(n, d_dict, generator=g, dtype=torch.float64)
    values, indices, exact = batch_topk_candidates(pre, k, 4 * k)
    assert bool(exact)
    assert int((values > 0).sum()) == k * n  # exactly k·n kept, all positive here
    assert torch.equal(_dense(values, indices, d_dict), batch_topk_mask(pre, k))


@pytest.mark.parametrize("case", ["random", "dominating", "few_positive", "ties", "nan"])
def test_batch_topk_above_equals_reference(case):
    """One threshold for the batch (numba) gives exactly the batch top-(k·n) of the reference, as dense codes."""
    from saekit.dictionaries.fast import batch_topk_above

    g = torch.Generator().manual_seed(3)
    pre = torch.randn(200, 96, generator=g)
    k = 4
    if case == "dominating":
        pre[5] += 30  # one token deserves all 96 latents
    elif case == "few_positive":
        pre = -pre.abs()
        pre[::7, 3] = 1.0  # 29 positives, fewer than k·n = 800
    elif case == "ties":
        pre = torch.randint(-3, 4, (200, 96), generator=g).float()
    elif case == "nan":
        pre[9, 9] = torch.nan
    got = batch_topk_above(pre, k)
    if case == "nan":
        assert got is None
        return
    values, indices = got
    dense = torch.zeros_like(pre).scatter_add_(1, indices, values)
    ref = batch_topk_mask(pre, k)
    if case == "ties":  # which tied entries are kept may differ; the kept values may not
        assert torch.equal(dense.flatten().sort().values, ref.flatten().sort().values)
    else:
        assert torch.equal(dense, ref)
    assert (values > 0).sum() == min(k * 200, int((pre > 0).sum()))


def test_batch_topk_candidates_detects_a_dominating_row():
    """One row holding most of the batch's largest values is saturated: `exact` is False, as it must be."""
    g = torch.Generator().manual_seed(5)
    n, d_dict, k = 32, 64, 2
    pre = torch.randn(n, d_dict, generator=g)
    pre[7] += 10.0  # row 7 deserves all of its 64 latents, far more than 4k = 8
    values, indices, exact = batch_topk_candidates(pre, k, 4 * k)
    assert not bool(exact)
    ref = batch_topk_mask(pre, k)
    assert int((ref[7] > 0).sum()) > 4 * k  # the reference really keeps more than the candidates hold
    assert not torch.equal(_dense(values, indices, d_dict), ref)
    # with every value a candidate the search is exact again
    values, indices, exact = batch_topk_candidates(pre, k, d_dict)
    assert bool(exact) and torch.equal(_dense(values, indices, d_dict), ref)


def test_batch_topk_candidates_with_ties_and_few_positives():
    """Ties at the threshold (quantised values) and a batch with fewer than k·n positives stay valid."""
    g = torch.Generator().manual_seed(6)
    n, d_dict, k = 40, 50, 3
    pre = torch.randint(-3, 4, (n, d_dict), generator=g).double()  # many exact ties
    values, indices, exact = batch_topk_candidates(pre, k, 4 * k)
    assert int((pre == 3).sum(1).max()) > 4 * k  # rows hold more tied maxima than candidates: ties, not saturation
    assert bool(exact)
    f = _dense(values, indices, d_dict)
    _assert_valid_batch_topk(f, pre, k)
    assert torch.equal(f.flatten().sort().values, batch_topk_mask(pre, k).flatten().sort().values)
    sparse = torch.full((n, d_dict), -1.0, dtype=torch.float64)
    sparse[torch.arange(n), torch.arange(n) % d_dict] = 2.0  # one positive per row: n < k·n positives
    values, indices, exact = batch_topk_candidates(sparse, k, 4 * k)
    assert bool(exact) and int((values > 0).sum()) == n
    assert torch.equal(_dense(values, indices, d_dict), batch_topk_mask(sparse, k))


@pytest.mark.parametrize("dominating", [False, True])
@pytest.mark.parametrize("step", ["fused", "autograd"])
def test_batchtopk_training_forward_candidates_match_full_path(dominating, step, monkeypatch):
    """Same loss, terms, fired, L0, θ and gradients from the candidate path (or its fallback) as from the reference,
    with the candidates' encoder fused (`TopKEncode` with BatchTopK's selection and AuxK's codes) or through autograd."""
    from saekit.dictionaries import fast

    monkeypatch.setattr(fast, "_TOPK_STEP", step)

    g = torch.Generator().manual_seed(8)
    cfg = DictConfig(kind="batchtopk", d_in=8, d_dict=256, k=2)
    xn = torch.nn.functional.normalize(torch.randn(96, 8, generator=g, dtype=torch.float64), dim=-1) * 3
    if dominating:
        xn[3] *= 40  # this token's pre-activations dwarf the rest: the candidate search must fall back
    dead = torch.zeros(256, dtype=torch.bool)
    dead[:5] = True
    outs = {}
    for mode in ("full", "candidates"):
        monkeypatch.setattr(fast, "_BATCHTOPK", mode)
        d = BatchTopKSAE(cfg).double()
        d.reset_parameters(torch.Generator().manual_seed(0))
        out = d.training_forward(xn, dead=dead, aux_k=4)
        out.loss.backward()
        outs[mode] = (out, d, {n: p.grad.clone() for n, p in d.named_parameters()})
    (a, da, ga), (b, db, gb) = outs["full"], outs["candidates"]
    pre = da.pre_acts(xn).detach()
    assert bool(batch_topk_candidates(pre, 2, 8)[2]) is not dominating  # both branches really taken
    torch.testing.assert_close(a.loss, b.loss)
    for name in a.terms:
        torch.testing.assert_close(a.terms[name], b.terms[name])
    assert torch.equal(a.fired, b.fired) and not a.fired.all()
    torch.testing.assert_close(a.l0, b.l0)
    torch.testing.assert_close(da.threshold, db.threshold)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], msg=name)


# --- TopK: grouped row top-k and the fused encoder ---------------------------------------------

@pytest.mark.parametrize("mode", ["numba", "grouped"])
@pytest.mark.parametrize("width,k,ties", [(512, 16, False), (512, 16, True), (64, 3, True), (96, 5, False), (40, 7, False)])
def test_row_topk_equals_torch_topk(width, k, ties, mode, monkeypatch):
    """Same values per row (as multisets) as torch.topk, indices that point at them, gradient of a gather."""
    monkeypatch.setattr(fast, "_TOPK", mode)
    g = torch.Generator().manual_seed(width + k)
    x = torch.randint(-3, 4, (257, width), generator=g).double() if ties else torch.randn(257, width, generator=g, dtype=torch.float64)
    x[0, :] = -torch.inf
    x[0, 5] = 1.0  # a row with one finite value
    x.requires_grad_()
    assert fast._topk_group(width, k) in (1, 4, 8)
    values, indices = row_topk(x, k)
    ref_values, _ = x.topk(k, dim=-1)
    torch.testing.assert_close(values.sort(-1).values, ref_values.sort(-1).values)
    assert torch.equal(x.detach().gather(1, indices), values.detach())
    assert all(len(set(r.tolist())) == k for r in indices)  # k distinct latents per row
    w = torch.randn(257, k, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((values * w).sum(), x)
    expect = torch.zeros_like(x).scatter(1, indices, w)
    assert torch.equal(grad, expect)


def test_row_topk_modes_select_the_same(monkeypatch):
    """numba (the default, and importable here), grouped and plain torch.topk pick the same entries."""
    assert fast._TOPK == "numba" and fast._kernels() is not None
    x = torch.randn(300, 512, generator=torch.Generator().manual_seed(1))
    picks = []
    for mode in ("numba", "grouped", "plain"):
        monkeypatch.setattr(fast, "_TOPK", mode)
        v, i = row_topk(x, 16)
        picks.append((v.sort(-1).values, i.sort(-1).values))
    for v, i in picks[1:]:
        assert torch.equal(i, picks[0][1])
        torch.testing.assert_close(v, picks[0][0])


def test_topk_encode_matches_autograd():
    """TopKEncode's values, indices and gradients (W_enc, b_enc, b_dec) equal plain autograd's, workspace reused."""
    xn, (W_enc, b_enc, _, b_dec) = _params(n=200, d_in=8, d_dict=64)
    b_enc = (b_enc.detach() - 3.5).requires_grad_()  # most pre-activations negative: the ReLU cuts some selected
    ws: dict = {}
    for step in range(2):
        x = xn * (1 + step)
        w = torch.randn(200, 5, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        values, indices, _, _ = TopKEncode.apply(x, W_enc, b_enc, b_dec, 5, ws)
        got = torch.autograd.grad((values * w).sum(), (W_enc, b_enc, b_dec))
        pre = (x - b_dec) @ W_enc + b_enc
        ref_v = pre.gather(1, indices).relu()
        assert (ref_v == 0).any() and (ref_v > 0).any()  # some selected values are cut by the ReLU
        ref = torch.autograd.grad((ref_v * w).sum(), (W_enc, b_enc, b_dec))
        torch.testing.assert_close(values, ref_v)
        torch.testing.assert_close(values.sort(-1).values, pre.topk(5, dim=-1).values.relu().sort(-1).values)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)
    assert set(ws) == {"pre"}


@pytest.mark.parametrize("n_dead", [None, 0, 3, 40])
def test_topk_training_forward_fused_equals_autograd(monkeypatch, n_dead):
    """TopKSAE's step: the fused encoder gives the autograd path's loss and parameter gradients, AuxK
    included (fewer and more dead latents than k_aux = 8)."""
    d = TopKSAE(DictConfig(kind="topk", d_in=16, d_dict=128, k=6))
    xn = torch.randn(256, 16, generator=torch.Generator().manual_seed(4))
    dead = None
    if n_dead is not None:
        dead = torch.zeros(128, dtype=torch.bool)
        dead[torch.randperm(128, generator=torch.Generator().manual_seed(5))[:n_dead]] = True
    grads = {}
    for mode in ("fused", "autograd"):
        monkeypatch.setattr(fast, "_TOPK_STEP", mode)
        out = d.training_forward(xn, dead=dead)
        assert (out.terms["auxk"] > 0) == bool(n_dead)
        grads[mode] = (out.loss.detach(), out.fired, out.l0, *torch.autograd.grad(out.loss, list(d.parameters())))
    for a, b in zip(grads["fused"], grads["autograd"]):
        torch.testing.assert_close(a, b)
