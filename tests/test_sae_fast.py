"""Fast paths in saekit.dictionaries.sae against their eager references (STYLE.md 9)."""

from __future__ import annotations

import pytest
import torch

from saekit.dictionaries.base import DictConfig
from saekit.dictionaries.sae import ReluLoss, ReluSAE, relu_loss_eager


def _params(n=64, d_in=8, d_dict=24, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xn = torch.randn(n, d_in, generator=g, dtype=dtype) * 2 + 0.5
    ps = [torch.randn(d_in, d_dict, generator=g, dtype=dtype) * 0.3, torch.randn(d_dict, generator=g, dtype=dtype) * 0.2,
          torch.randn(d_dict, d_in, generator=g, dtype=dtype) * 0.3, torch.randn(d_in, generator=g, dtype=dtype) * 0.1]
    return xn, [p.requires_grad_() for p in ps]


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_relu_loss_matches_eager(lam):
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


def test_relu_loss_gradcheck():
    """The hand-written backward against finite differences (output scaled by a non-unit upstream gradient)."""
    xn, ps = _params(n=16, d_in=4, d_dict=6, seed=1)
    assert torch.autograd.gradcheck(lambda *p: 1.7 * ReluLoss.apply(xn, *p, 2.0)[0], ps)


def test_relu_sae_training_forward_uses_both_paths_alike():
    """ReluSAE's TrainOutput (fired flags from Σ_n f) equals the eager reference's on float32."""
    d = ReluSAE(DictConfig(kind="relu", d_in=8, d_dict=24, l1=2.0))
    xn = torch.randn(128, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        d.b_enc.copy_(torch.linspace(-0.3, 0.1, 24))
    out = d.training_forward(xn)
    f = d.encode_n(xn)
    ref = relu_loss_eager(xn, d.W_enc, d.b_enc, d.W_dec, d.b_dec, 2.0)
    torch.testing.assert_close(out.loss, ref[0])
    assert torch.equal(out.fired, (f > 0).any(0)) and not out.fired.all()
    torch.testing.assert_close(out.l0, (f > 0).sum(-1).float().mean())
