"""The fast paths of an in-model codebook training step against their plain references (benchmarks/codebook_speed.py)."""

from __future__ import annotations

import torch

from saekit.dictionaries.codebook_k1 import argmax_last


def test_argmax_last_equals_torch_argmax_with_ties_nan_and_signed_zeros():
    g = torch.Generator().manual_seed(0)
    sims = torch.randint(-3, 4, (5, 37, 50), generator=g).float()  # few distinct values: many tied maxima
    sims[0, 3, 7] = float("nan")  # a NaN beats everything in torch: its index comes back
    sims[0, 4, 10:] = float("nan")
    sims[1, 0] = 0.0
    sims[1, 0, 5] = -0.0  # equal to 0.0: the first one wins
    sims[2, 1] = float("-inf")
    sims[2, 2, 9] = float("inf")
    assert torch.equal(argmax_last(sims), sims.argmax(-1))
    wide = torch.randn(300, 1000, generator=g)
    assert torch.equal(argmax_last(wide), wide.argmax(-1))


# --- the whole training step against a plain reference ----------------------------------------------

import copy  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from saekit import metrics  # noqa: E402
from saekit.dictionaries.codebook import code_similarity, group_layer_norm  # noqa: E402
from saekit.inmodel.codebooks import InModelCodebook, build_codebook, parse_spec  # noqa: E402
from saekit.inmodel.finetune import FinetuneConfig, make_phase, train_step  # noqa: E402
from saekit.inmodel.model import load_in_model  # noqa: E402
from saekit.inmodel.sites import Splicer  # noqa: E402
from saekit.tokens import PAD, masked_mean, model_input, row_mask, scored_mask  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "attn:k=1,codes=50,groups=heads,sim=cosine;mlp:k=1,codes=40,sim=inner"


def _plain_codebook(d, objective: str, mask, terms: dict):
    """The in-model codebook written out the plain way: gather the replaced rows, a dense similarity, a one-hot
    product for the chosen codes (so the code gradient is a dense matmul's), scatter back."""
    G, C, d_g = d.codebook.shape

    def fn(x):
        rows = x[mask]  # (n, d_in)
        xn = rows * d.scale
        x_in = group_layer_norm(xn, d.ln_weight, d.ln_bias) if d.cfg.input_norm == "layernorm" else xn
        with torch.no_grad():
            idx = code_similarity(x_in.view(-1, G, d_g), d.codebook, d.cfg.similarity).argmax(-1).t()  # (n, G)
        onehot = F.one_hot(idx, C).to(x.dtype)  # (n, G, C)
        x_hat = torch.einsum("ngc,gcd->ngd", onehot, d.codebook).reshape(-1, G * d_g)
        err = (x_hat - x_in.detach()).pow(2).sum(-1)
        if objective == "paper":
            terms[d.prov.hook] = err.mean()
            out_n = x_hat + x_in - x_in.detach()
        else:
            terms[d.prov.hook] = (err / x_in.shape[-1]).mean()
            out_n = x_hat.detach() + x_in - x_in.detach()
        out = x.clone()
        out[mask] = out_n / d.scale
        return out

    return fn


@pytest.mark.parametrize("objective,input_norm,skip_bos", [("paper", "layernorm", False), ("paper", "layernorm", True),
                                                           ("commit", "scale", True)])
def test_train_step_equals_the_plain_step(tiny_model_dir, objective, input_norm, skip_bos):
    """Loss, terms and every updated parameter (model, codes, LayerNorms) after three steps match a step written
    the plain way, to float tolerance; padding and BOS positions are left alone as before."""
    specs = parse_spec(SPEC, 2)
    im = load_in_model(tiny_model_dir, [s.hook for s in specs], torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    layers = {}
    for s in specs:
        d = build_codebook(s, im.shapes[s.hook], None, input_norm)
        with torch.no_grad():
            d.codebook.copy_(torch.randn(d.codebook.shape, generator=gen))
            d.scale.fill_(1.0 if input_norm == "layernorm" else 0.7)
            for name, p in d.named_parameters():
                if name.startswith("ln_"):
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        layers[s.hook] = InModelCodebook(d, objective)
    ref_hf, ref_dicts = copy.deepcopy(im.hf), {h: copy.deepcopy(layer.d) for h, layer in layers.items()}
    cfg = FinetuneConfig(model="x", codebooks=SPEC, lr=1e-2, codebook_lr=1e-2, commit_coef=0.5, replace_every=0,
                         skip_bos=skip_bos, objective=objective, input_norm=input_norm, codebook_weight_decay=0.01)
    ph = make_phase("fast", im.hf, layers, cfg)
    ref = make_phase("plain", ref_hf, {h: InModelCodebook(d, objective) for h, d in ref_dicts.items()}, cfg)
    fast_splicer, ref_splicer = Splicer(im.hf, list(im.sites.values())), Splicer(ref_hf, list(im.sites.values()))
    for step in range(3):
        t = torch.randint(1, 20, (3, 12), generator=gen)
        t[:, 0] = im.bos_id
        t[1, 9:] = PAD  # a padded sequence: its padding is never replaced nor scored
        got = train_step(ph, t, im.bos_id, fast_splicer, cfg)

        mask, terms = row_mask(t, skip_bos), {}
        inp = model_input(t, im.bos_id)
        with ref_splicer.active({h: _plain_codebook(d, objective, mask, terms) for h, d in ref_dicts.items()}):
            logits = ref_hf(input_ids=inp).logits
        ce = masked_mean(metrics.ce_per_token(logits, inp), scored_mask(t))
        loss = ce + cfg.commit_coef * sum(terms.values())
        ref.opt.zero_grad(set_to_none=True)
        loss.backward()

        assert torch.allclose(got["ce"], ce.detach(), rtol=1e-5, atol=1e-6), step
        assert terms.keys() == ref_dicts.keys()
        for h, want in terms.items():
            assert torch.allclose(got[f"commit/{h}"], want.detach(), rtol=1e-5, atol=1e-6), (step, h)
        # Gradients (train_step leaves them in .grad) to float tolerance.  Adam's first steps are ~lr·sign(g), so a
        # rounding-size difference in a near-zero gradient would flip an update: the reference steps from the fast
        # side's gradients, and the updated parameters must then agree too.
        fast = [*im.hf.named_parameters()] + [(f"{h}.{n}", p) for h, layer in layers.items() for n, p in layer.d.named_parameters()]
        plain = [*ref_hf.parameters()] + [p for d in ref_dicts.values() for p in d.parameters()]
        assert len(fast) == len(plain)
        for (name, p), q in zip(fast, plain):
            assert p.grad is not None and q.grad is not None, (step, name)
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5 * float(q.grad.abs().max()) + 1e-12), (step, name)
            q.grad = p.grad.clone()
        ref.opt.step()
        for (name, p), q in zip(fast, plain):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), (step, name)


@pytest.mark.parametrize("objective", ["paper", "commit"])
def test_codes_out_equals_its_autograd_reference(objective):
    from saekit.inmodel.codebooks import codes_out, codes_out_reference

    g = torch.Generator().manual_seed(3)
    G, C, d_g, n = 3, 20, 5, 40
    grads = {}
    for fn in (codes_out, codes_out_reference):
        x = torch.randn(n, G * d_g, generator=torch.Generator().manual_seed(1), requires_grad=True)
        cb = torch.randn(G, C, d_g, generator=torch.Generator().manual_seed(2), requires_grad=True)
        idx = torch.randint(0, C, (n, G, 1), generator=torch.Generator().manual_seed(4))
        w_out, w_term = torch.randn(n, G * d_g, generator=g), torch.rand(n, generator=g)
        out, term = fn(x * 1.5, cb, idx, objective)  # x·1.5: the gradient to x goes through another op
        (out * w_out).sum().add((term * w_term).sum()).backward()
        grads[fn.__name__] = (out.detach(), term.detach(), x.grad, cb.grad)
        g = torch.Generator().manual_seed(3)  # the same weights for both
    fast, ref = grads["codes_out"], grads["codes_out_reference"]
    assert torch.equal(fast[0], ref[0])  # the forward value is the chosen codes, exactly
    for a, b in zip(fast[1:], ref[1:]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (ref[3].abs().sum((0, 2)) > 0).all()  # codes in every group got a gradient


def test_last_rows_are_the_replaced_rows_only():
    from saekit.dictionaries import DictConfig
    from saekit.dictionaries.codebook import Codebook

    d = Codebook(DictConfig(kind="codebook", d_in=8, d_dict=12, k=1, groups=2))
    d.scale.fill_(0.5)
    layer = InModelCodebook(d, "paper")
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 0] = False
    mask[2, 3:] = False
    layer.mask = mask
    layer(x)
    assert torch.equal(layer.last_rows, x[mask] * 0.5)
    layer.mask = None
    layer(x)
    assert torch.equal(layer.last_rows, x.reshape(15, 8) * 0.5)


def test_k1_choice_in_float64_and_odd_blocks_equals_the_reference():
    from saekit.dictionaries.codebook import code_similarity
    from saekit.dictionaries.codebook_k1 import choose_codes_k1

    g = torch.Generator().manual_seed(5)
    xn, cb = torch.randn(45, 6, generator=g), torch.randn(2, 30, 3, generator=g)
    ref = code_similarity(xn.view(45, 2, 3), cb, "inner").argmax(-1).t()
    for x, block in ((xn, 7), (xn, None), (xn.double(), 7)):  # a partial last block; the default; the torch path
        assert torch.equal(choose_codes_k1(x, cb, "inner", block=block)[..., 0], ref)
