"""Dictionary kinds: maths against plain references written here, decoder constraint, AuxK, save/load."""

from __future__ import annotations

import pytest
import torch

from saekit.dictionaries import DictConfig, Provenance, build
from saekit.interop import load
from saekit.dictionaries.codebook import Codebook
from saekit.dictionaries.fast import sparse_decode_bag, sparse_decode_csr, sparse_decode_dense
from saekit.dictionaries.sae import BatchTopKSAE, ReluSAE, TopKSAE, geometric_median

D_IN, D_DICT = 12, 40


def randomised(d, seed=0):
    """Give every parameter random values so tests don't pass by symmetry of the init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return d


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


# --- plain references --------------------------------------------------------------------------

def ref_topk_codes(x, W_enc, b_enc, b_dec, k):
    """Row by row: sort the pre-activations, keep the k largest, ReLU them."""
    out = torch.zeros(x.shape[0], W_enc.shape[1])
    for i in range(x.shape[0]):
        pre = (x[i] - b_dec) @ W_enc + b_enc
        order = sorted(range(len(pre)), key=lambda j: -float(pre[j]))[:k]
        for j in order:
            out[i, j] = max(float(pre[j]), 0.0)
    return out


def ref_codebook(x, codebook, k, similarity):
    """Loop over tokens and groups: pick the k most similar codes, sum them."""
    G, C, dg = codebook.shape
    codes = torch.zeros(x.shape[0], G * C)
    x_hat = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for g in range(G):
            xs = x[i, g * dg:(g + 1) * dg]
            sims = []
            for c in range(C):
                v = codebook[g, c]
                s = float(xs @ v)
                if similarity == "cosine":
                    s /= float(v.norm()) * float(xs.norm())
                sims.append(s)
            for c in sorted(range(C), key=lambda j: -sims[j])[:k]:
                codes[i, g * C + c] = 1.0
                x_hat[i, g * dg:(g + 1) * dg] += codebook[g, c]
    return codes, x_hat


# --- TopK -----------------------------------------------------------------------------------------

def test_topk_matches_reference():
    d = randomised(build(DictConfig(kind="topk", d_in=D_IN, d_dict=D_DICT, k=5), Provenance(scale=2.0)))
    x = torch.randn(9, D_IN)
    xn = x * 2.0
    f_ref = ref_topk_codes(xn, d.W_enc, d.b_enc, d.b_dec, 5)
    torch.testing.assert_close(d.encode(x), f_ref)
    torch.testing.assert_close(d.decode(f_ref), (f_ref @ d.W_dec + d.b_dec) / 2.0)
    out = d.training_forward(xn)
    mse_ref = ((f_ref @ d.W_dec + d.b_dec - xn) ** 2).sum(-1).mean() / D_IN
    torch.testing.assert_close(out.terms["mse"], mse_ref)
    assert out.l0.item() == pytest.approx((f_ref > 0).sum(-1).float().mean().item())
    assert torch.equal(out.fired, (f_ref > 0).any(0))


def test_sparse_decode_paths_agree_with_gradients():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(D_DICT, D_IN, generator=g)
    vals = torch.rand(7, 4, generator=g)
    idx = torch.randint(0, D_DICT, (7, 4), generator=g)
    results = []
    for fn in (sparse_decode_dense, sparse_decode_bag, sparse_decode_csr):
        Wp, vp = W.clone().requires_grad_(), vals.clone().requires_grad_()
        y = fn(vp, idx, Wp)
        (y * torch.arange(D_IN)).sum().backward()
        results.append((y.detach(), Wp.grad, vp.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)


def test_unit_norm_decoder_projection():
    d = randomised(build(DictConfig(kind="topk", d_in=D_IN, d_dict=D_DICT, k=3)))
    with torch.no_grad():
        d.W_dec.div_(d.W_dec.norm(dim=-1, keepdim=True))
    d.training_forward(torch.randn(16, D_IN)).loss.backward()
    d.before_step()
    # the gradient left has no component along its own decoder row
    assert (d.W_dec.grad * d.W_dec).sum(-1).abs().max() < 1e-6
    with torch.no_grad():
        d.W_dec.add_(torch.randn_like(d.W_dec))
    d.after_step()
    torch.testing.assert_close(d.W_dec.norm(dim=-1), torch.ones(D_DICT))


def test_auxk_zero_without_dead_and_reaches_only_dead_latents():
    d = randomised(build(DictConfig(kind="topk", d_in=D_IN, d_dict=D_DICT, k=3)))
    x = torch.randn(32, D_IN)
    none_dead = torch.zeros(D_DICT, dtype=torch.bool)
    assert d.training_forward(x, dead=none_dead).terms["auxk"].item() == 0.0
    dead = torch.zeros(D_DICT, dtype=torch.bool)
    dead[:10] = True
    out = d.training_forward(x, dead=dead, aux_k=4)
    assert out.terms["auxk"].item() > 0
    d.zero_grad()
    out.terms["auxk"].backward()
    enc_grad = d.W_enc.grad.abs().sum(0)  # (d_dict,)
    assert enc_grad[:10].sum() > 0 and enc_grad[10:].sum() == 0


@pytest.mark.parametrize("n_dead, aux_k", [(10, 4), (3, 8), (D_DICT, 5)])
def test_auxk_on_the_dead_columns_equals_the_masked_reference(n_dead, aux_k):
    """The CPU path (top-k over the dead columns only) = top-k of pre masked to −inf off the dead latents."""
    from saekit.dictionaries.fast import normalized_mse, sparse_decode_dense

    d = randomised(build(DictConfig(kind="topk", d_in=D_IN, d_dict=D_DICT, k=3)))
    x = torch.randn(32, D_IN)
    dead = torch.zeros(D_DICT, dtype=torch.bool)
    dead[torch.randperm(D_DICT, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    pre = d.pre_acts(x)
    resid = torch.randn(32, D_IN)
    got = d.aux_loss(pre, -resid, dead, aux_k)  # it takes the error x̂ − x; the residual is its negative
    (g_got,) = torch.autograd.grad(got, d.W_enc, retain_graph=True)
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    values, indices = masked.topk(min(aux_k, D_DICT), dim=-1)
    want = normalized_mse(sparse_decode_dense(values.relu(), indices, d.W_dec), resid)
    (g_want,) = torch.autograd.grad(want, d.W_enc)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def test_batchtopk_keeps_k_per_token_on_average_and_threshold_encodes():
    d = randomised(build(DictConfig(kind="batchtopk", d_in=D_IN, d_dict=D_DICT, k=4)))
    x = torch.randn(50, D_IN)
    pre = d.pre_acts(x)
    out = d.training_forward(x)
    assert out.l0.item() == pytest.approx(4.0)
    # threshold = smallest activation kept in this (first) batch: the (4·50)-th largest of ReLU(pre)
    kth = pre.relu().flatten().sort(descending=True).values[4 * 50 - 1]
    assert d.threshold.item() == pytest.approx(kth.item())
    f = d.encode_n(x)
    torch.testing.assert_close(f, torch.where(pre > kth, pre, torch.zeros_like(pre)))
    # running mean on the next batch
    x2 = torch.randn(50, D_IN)
    kth2 = d.pre_acts(x2).relu().flatten().sort(descending=True).values[4 * 50 - 1]
    d.training_forward(x2)
    m = d.threshold_momentum
    assert d.threshold.item() == pytest.approx(m * kth.item() + (1 - m) * kth2.item(), rel=1e-5)


def test_relu_loss_formula():
    d = randomised(build(DictConfig(kind="relu", d_in=D_IN, d_dict=D_DICT, l1=3.0)))
    x = torch.randn(20, D_IN)
    f = torch.relu((x - d.b_dec) @ d.W_enc + d.b_enc)
    x_hat = f @ d.W_dec + d.b_dec
    want = ((x - x_hat) ** 2).sum(-1).mean() / D_IN + 3.0 * (f * d.W_dec.norm(dim=-1)).sum(-1).mean() / D_IN
    torch.testing.assert_close(d.training_forward(x).loss, want)
    torch.testing.assert_close(d.training_forward(x, l1_coef=0.0).loss, ((x - x_hat) ** 2).sum(-1).mean() / D_IN)


def test_geometric_median_minimises_sum_of_distances():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 5, generator=g), 100 + torch.randn(20, 5, generator=g)])  # outliers
    m = geometric_median(x)

    def cost(p):
        return (x - p).norm(dim=-1).sum()

    for _ in range(20):
        assert cost(m) <= cost(m + 0.05 * torch.randn(5, generator=g)) + 1e-4
    assert cost(m) < cost(x.mean(0))


def test_geometric_median_survives_a_large_common_offset():
    """Same median (shifted) when every row carries a large offset: the distance expansion must not cancel."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(300, 16, generator=g), 8 + torch.randn(30, 16, generator=g)])
    shift = torch.full((16,), 300.0)
    torch.testing.assert_close(geometric_median(x + shift) - shift, geometric_median(x), atol=1e-4, rtol=0)


# --- Codebook --------------------------------------------------------------------------------------

@pytest.mark.parametrize("similarity", ["cosine", "inner"])
@pytest.mark.parametrize("groups", [1, 3])
def test_codebook_matches_reference(similarity, groups):
    d = randomised(build(DictConfig(kind="codebook", d_in=D_IN, d_dict=36, k=2, groups=groups, similarity=similarity), Provenance(scale=0.5)))
    x = torch.randn(8, D_IN)
    xn = x * 0.5
    codes_ref, xhat_ref = ref_codebook(xn, d.codebook.detach(), 2, similarity)
    torch.testing.assert_close(d.encode(x), codes_ref)
    torch.testing.assert_close(d.decode(codes_ref), xhat_ref / 0.5)
    torch.testing.assert_close(codes_ref @ d.W_dec, xhat_ref)  # block W_dec agrees with the lookup
    out = d.training_forward(xn)
    torch.testing.assert_close(out.loss, ((xhat_ref - xn) ** 2).sum(-1).mean() / D_IN)
    out.loss.backward()
    used = (d.codebook.grad.abs().sum(-1) > 0).flatten()  # (G·C,) codes that received gradient
    assert torch.equal(used, codes_ref.bool().any(0))
    assert torch.equal(out.fired, codes_ref.bool().any(0))


@pytest.mark.parametrize("k", [1, 2])
def test_codebook_kmeans_init_and_dead_replacement(k):
    d = build(DictConfig(kind="codebook", d_in=8, d_dict=8 * k, k=k, groups=2))  # 4k codes per group
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 5
    x = centres[torch.randint(0, 4, (400,), generator=g)] + 0.01 * torch.randn(400, 8, generator=g)
    d.init_from_data(x)
    # each group's codes are the 4 cluster centres of that slice (k=1: no division)
    for grp in range(2 if k == 1 else 0):
        want = centres[:, grp * 4:(grp + 1) * 4]
        dist = torch.cdist(want, d.codebook[grp].detach())
        assert dist.min(1).values.max() < 0.05
    C = 4 * k
    dead = torch.zeros(2 * C, dtype=torch.bool)
    dead[[1, C + 2]] = True
    before = d.codebook.detach().clone()
    recent = x[:10]
    resid = (recent - d(recent).x_hat).view(10, 2, 4)  # what the codebook misses on those rows
    masks = d.resample_dead(dead, recent, torch.Generator().manual_seed(0))
    assert torch.equal(masks["codebook"].flatten(), dead)
    after = d.codebook.detach()
    assert torch.equal(after.view(2 * C, 4)[~dead], before.view(2 * C, 4)[~dead])
    # k > 1: a replaced code is the residual slice of one of the recent rows (a missing component), in its own group;
    # k = 1: the input slice itself, so that input now chooses it and is reconstructed exactly
    want = resid if k > 1 else recent.view(10, 2, 4)
    for grp, code in ((0, 1), (1, 2)):
        assert torch.cdist(after[grp, code][None], want[:, grp]).min() < 1e-6
    if k == 1:
        row = torch.cdist(after[0, 1][None], want[:, 0]).argmin()
        assert d.encode(recent[row][None])[0, :C].argmax() == 1


# --- files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "codebook"])
def test_save_load_round_trip_exact(kind, tmp_path):
    cfg = DictConfig(kind=kind, d_in=D_IN, d_dict=36, k=3, l1=2.0, groups=3 if kind == "codebook" else 1)
    prov = Provenance(hook="blocks.0.hook_resid_post", model={"name": "m"}, hook_shape=[D_IN], scale=1.7, store="s")
    d = randomised(build(cfg, prov))
    if kind == "batchtopk":
        d.threshold.fill_(0.3)
    d.summary = {"fvu": 0.1}
    d.save(tmp_path / "d")
    e = load(tmp_path / "d")
    assert type(e) is type(d) and e.cfg == d.cfg and e.summary == d.summary
    assert e.prov.hook == prov.hook and e.prov.model == prov.model and e.prov.hook_shape == prov.hook_shape
    assert e.prov.scale == pytest.approx(1.7) and torch.equal(e.scale, d.scale)
    for (ka, va), (kb, vb) in zip(d.state_dict().items(), e.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(6, D_IN)
    assert torch.equal(d.encode(x), e.encode(x))
    assert torch.equal(d(x).x_hat, e(x).x_hat)
    assert not list(tmp_path.glob("d/*.tmp"))


def test_classes_and_parameter_names():
    names = {"relu": ReluSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE, "codebook": Codebook}
    for kind, cls in names.items():
        d = build(DictConfig(kind=kind, d_in=D_IN, d_dict=36, k=3))
        assert type(d) is cls and d.W_dec.shape == (36, D_IN)
    sae = build(DictConfig(kind="batchtopk", d_in=D_IN, d_dict=36, k=3))
    assert {k: tuple(v.shape) for k, v in sae.named_parameters()} == {
        "W_enc": (D_IN, 36), "b_enc": (36,), "W_dec": (36, D_IN), "b_dec": (D_IN,)}
    assert sae.threshold.shape == ()
    # encoder starts as the decoder's transpose, decoder rows unit norm
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(36))
