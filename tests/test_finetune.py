"""In-model (joint) codebook training: gradients, hook sites, identity codebooks, the finetune job and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saekit.inmodel import finetune as ft
from pathlib import Path
from saekit.inmodel.codebooks import CodebookSpec, InModelCodebook, build_codebook, commitment, norm_scale, parse_spec, straight_through
from saekit.inmodel.data import TokenData, batch_at, load_tokens
from saekit.inmodel.finetune import FinetuneConfig, FinetunePaths, finetune
from saekit.config import from_flags
from saekit.inmodel.model import load_in_model, sample_rows, spliced_logits
from saekit.inmodel.sites import Splicer, hook_site
from saekit.tokens import masked_mean, model_input, row_mask, scored_mask
from saekit.dictionaries import DictConfig, Provenance
from saekit.interop import load
from saekit.dictionaries.codebook import Codebook
from saekit.errors import SaekitError


# --- pure maths ---------------------------------------------------------------------------------

def test_straight_through_gradient_is_identity_to_input_and_zero_to_codes():
    torch.manual_seed(0)
    x = torch.randn(5, 6, requires_grad=True)
    x_hat = torch.randn(5, 6, requires_grad=True)
    w = torch.randn(5, 6)
    out = straight_through(x, x_hat)
    assert torch.equal(out, x_hat)  # forward value: the codebook output
    (out * w).sum().backward()
    assert torch.equal(x.grad, w)  # backward: exactly what the identity would give
    assert x_hat.grad is None or torch.all(x_hat.grad == 0)


def test_commitment_reaches_only_the_codes():
    torch.manual_seed(0)
    xn = torch.randn(7, 4, requires_grad=True)
    codes = torch.randn(7, 4, requires_grad=True)
    commitment(codes, xn).mean().backward()
    assert xn.grad is None or torch.all(xn.grad == 0)
    expected = 2 * (codes - xn).detach() / (7 * 4)  # d/dc of mean_n ‖c − x‖²/d
    assert torch.allclose(codes.grad, expected)


# --- the tiny model, its hook sites -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    hooks = ["blocks.0.attn.hook_z", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post",
             "blocks.1.hook_attn_out", "blocks.0.mlp.hook_post", "blocks.1.hook_mlp_out"]
    return load_in_model(tiny_model_dir, hooks, torch.device("cpu"))


def _tokens(n=3, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(2, 41, (n, t), generator=g)
    tok[:, 0] = 0
    return tok


def test_hf_sites_see_the_bridge_activations(tiny, tiny_model_dir):
    """The HF module hooks read what saekit.models.capture reads through the TransformerLens bridge."""
    from saekit.models import capture, load_model

    bridge = load_model(tiny_model_dir).bridge
    tok = _tokens()
    hooks = list(tiny.sites)
    ref = capture(bridge, tok, hooks)
    got = {}

    def saver(h):
        def fn(x):
            got[h] = x.detach().clone()
            return x

        return fn

    with torch.no_grad(), Splicer(tiny.hf, list(tiny.sites.values())).active({h: saver(h) for h in hooks}):
        tiny.hf(input_ids=tok)
    for h in hooks:
        assert got[h].shape == ref[h].shape, h
        assert torch.allclose(got[h], ref[h], atol=1e-5), h
    assert tiny.shapes["blocks.0.attn.hook_z"] == [4, 8]


def test_unsupported_hook_is_refused(tiny_model_dir):
    from saekit.models import load_model

    adapter = load_model(tiny_model_dir).bridge.adapter
    with pytest.raises(SaekitError, match="supports the hooks"):
        hook_site(adapter, "blocks.0.attn.hook_pattern")


# --- identity codebooks -----------------------------------------------------------------------------

def _identity_codebook(rows: torch.Tensor, hook: str, shape: list[int], groups: int) -> Codebook:
    """Codes = every row's slices (normalised), k=1: each row picks itself (cosine 1), so x̂ = x exactly."""
    n, width = rows.shape
    scale = norm_scale(rows)
    cb = Codebook(DictConfig(kind="codebook", d_in=width, d_dict=n * groups, k=1, groups=groups),
                  Provenance(hook=hook, hook_shape=shape, scale=scale))
    with torch.no_grad():
        cb.codebook.copy_((rows * scale).view(n, groups, width // groups).transpose(0, 1))
    return cb


def _rows(tiny, hooks, tok, skip_bos=True):
    data = TokenData(tok.numpy().astype(np.int32), tok.numpy().astype(np.int32), "test")
    return sample_rows(tiny.hf, Splicer(tiny.hf, list(tiny.sites.values())), hooks, data, tiny.bos_id, 10**6, 8, skip_bos)


def test_identity_codebooks_reproduce_loss_and_model_gradients(tiny):
    hooks = ["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"]
    groups = {"blocks.0.attn.hook_z": 4, "blocks.1.hook_mlp_out": 1}
    tok = _tokens()
    rows = _rows(tiny, hooks, tok)
    layers = {h: InModelCodebook(_identity_codebook(rows[h], h, tiny.shapes[h], groups[h])) for h in hooks}
    splicer = Splicer(tiny.hf, list(tiny.sites.values()))
    hf = tiny.hf
    for p in hf.parameters():
        p.requires_grad_(True)
    inp, m = model_input(tok, tiny.bos_id), scored_mask(tok)

    def ce(logits):
        from saekit import metrics

        return masked_mean(metrics.ce_per_token(logits, inp), m)

    hf.zero_grad()
    clean_loss = ce(hf(input_ids=inp).logits)
    clean_loss.backward()
    clean_grads = {n: p.grad.clone() for n, p in hf.named_parameters()}

    hf.zero_grad()
    spliced = spliced_logits(hf, tok, tiny.bos_id, splicer, layers, skip_bos=True)
    loss = ce(spliced)
    assert torch.allclose(loss, clean_loss, atol=1e-5)
    loss.backward(retain_graph=True)
    for n, p in hf.named_parameters():  # straight-through: the model's gradient is the clean model's, below and above
        assert torch.allclose(p.grad, clean_grads[n], atol=1e-5), n
    for layer in layers.values():  # the LM loss never reaches the codes
        assert layer.d.codebook.grad is None or torch.all(layer.d.codebook.grad == 0)
        assert layer.last_commit.item() < 1e-8  # codes equal the inputs

    # The commitment term reaches the codes and nothing in the model.
    hf.zero_grad()
    for layer in layers.values():
        with torch.no_grad():
            layer.d.codebook.mul_(1.1)  # move the codes off the inputs so the term is non-zero
    spliced_logits(hf, tok, tiny.bos_id, splicer, layers, skip_bos=True)
    commit = sum(layer.last_commit for layer in layers.values())
    assert commit.item() > 0
    commit.backward()
    for layer in layers.values():
        assert layer.d.codebook.grad.abs().sum() > 0
    for n, p in hf.named_parameters():
        assert p.grad is None or torch.all(p.grad == 0), n
    for p in hf.parameters():
        p.requires_grad_(False)


def test_spliced_output_equals_dictionary_forward(tiny):
    """In-model replacement = Codebook.forward (what splice-eval applies), on spliced rows; BOS untouched."""
    h = "blocks.1.hook_mlp_out"
    tok = _tokens(seed=1)
    rows = _rows(tiny, [h], _tokens(n=6, seed=2))[h]
    d = Codebook(DictConfig(kind="codebook", d_in=32, d_dict=16, k=3), Provenance(hook=h, scale=norm_scale(rows)))
    d.init_from_data(rows * d.scale)
    layer = InModelCodebook(d)
    layer.mask = row_mask(tok, True)
    x = torch.randn(3, 12, 32)
    out = layer(x)
    assert torch.allclose(out[:, 1:], d(x[:, 1:]).x_hat, atol=1e-6)
    assert torch.equal(out[:, 0], x[:, 0])


# --- spec -----------------------------------------------------------------------------------------

def test_parse_spec():
    specs = parse_spec("attn:k=8,groups=heads; mlp[1]:k=100,codes=4096,sim=inner", n_layers=2)
    assert [s.hook for s in specs] == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]
    assert specs[0].groups == "heads" and specs[0].k == 8
    assert specs[2].codes == 4096 and specs[2].similarity == "inner"
    assert [s.hook for s in parse_spec("blocks.0.hook_resid_post:k=2;resid[0-1]:k=1".replace(";resid[0-1]:k=1", ""), 2)] == ["blocks.0.hook_resid_post"]
    assert len(parse_spec("mlp[0-1]:k=2", 2)) == 2
    for bad, msg in [("mlp:k=x", "positive integer"), ("mlp:kk=2", "unknown key"), ("mlp[5]:k=2", "do not exist"),
                     ("foo:k=2", "is not attn"), ("mlp:k=2;mlp[0]:k=3", "twice"), ("", "no codebooks"), ("mlp:groups=0", "groups")]:
        with pytest.raises(SaekitError, match=msg):
            parse_spec(bad, 2)


def test_build_codebook_groups_and_errors():
    d = build_codebook(CodebookSpec("blocks.0.attn.hook_z", k=2, groups="heads"), [4, 8])
    assert d.cfg.groups == 4 and d.cfg.d_dict == 4 * 8 * 8 and d.cfg.k == 2
    with pytest.raises(SaekitError, match="head axis"):
        build_codebook(CodebookSpec("blocks.0.hook_mlp_out", k=2, groups="heads"), [32])
    with pytest.raises(SaekitError, match="no k"):
        build_codebook(CodebookSpec("blocks.0.hook_mlp_out"), [32])
    with pytest.raises(SaekitError, match="smaller than codes"):
        build_codebook(CodebookSpec("blocks.0.hook_mlp_out", k=4, codes=4), [32])


def test_batches_are_a_function_of_step():
    train = np.arange(10)[:, None].repeat(3, 1)
    a = [batch_at(train, s, 4, seed=1) for s in range(6)]
    b = batch_at(train, 4, 4, seed=1)
    assert np.array_equal(a[4], b)
    first_epoch = np.concatenate(a)[:10, 0]
    assert sorted(first_epoch.tolist()) == list(range(10))  # each epoch is a permutation


# --- the job ----------------------------------------------------------------------------------------

def _cfg(tiny_model_dir, tiny_text_file, out, **kw):
    base = dict(model=tiny_model_dir, data=tiny_text_file, out=str(out), codebooks="attn[0]:k=1,groups=heads,codes=8;mlp[1]:k=2,codes=16",
                steps=6, batch_size=4, seq_len=16, eval_sequences=8, init_rows=256, checkpoint_every=2, log_every=2,
                lr=1e-3, codebook_lr=1e-2, replace_every=3, dead_tokens=20)
    return from_flags(FinetuneConfig, **(base | kw))


def test_finetune_job_outputs_and_table(tiny_model_dir, tiny_text_file, tmp_path):
    from saekit import metrics
    from saekit.models import load_model

    res = finetune(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "ft"), progress=False)
    names = [r["model"] for r in res.table]
    assert names == ["original", "fine-tuned, no codebooks", "codebook model", "codebook model, codebooks removed"]
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in res.table)
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["table"] == res.table
    assert (tmp_path / "ft" / "baseline" / "config.json").is_file()
    assert not (tmp_path / "ft" / "checkpoints").exists()

    # The saved model loads as any model; the codebooks as any dictionary, pointing at it.
    lm = load_model(str(res.model))
    cbs = {load(p).prov.hook: load(p) for p in res.codebooks}
    assert set(cbs) == {"blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"}
    for d in cbs.values():
        assert d.prov.model["name"] == str(res.model)
    assert cbs["blocks.0.attn.hook_z"].cfg.groups == 4

    # Outside reference: splice the saved codebooks into the saved model through the bridge by hand;
    # the loss must be the table's "codebook model" row.
    cfg = _cfg(tiny_model_dir, tiny_text_file, tmp_path / "x")
    data = load_tokens(cfg.data, "", lm.tokenizer, lm.bos_id, cfg.seq_len, 1, cfg.eval_sequences)
    tok = torch.as_tensor(data.eval, dtype=torch.long)
    mask = row_mask(tok, True)

    def splice(d):
        def fn(act, hook):
            flat = act.reshape(*act.shape[:2], -1).clone()
            flat[mask] = d(flat[mask]).x_hat
            return flat.reshape(act.shape)

        return fn

    with torch.no_grad():
        logits = lm.bridge.run_with_hooks(model_input(tok, lm.bos_id), fwd_hooks=[(h, splice(d)) for h, d in cbs.items()])
    inp, m = model_input(tok, lm.bos_id), scored_mask(tok)
    ref = masked_mean(metrics.ce_per_token(logits, inp), m).item()
    row = next(r for r in res.table if r["model"] == "codebook model")
    assert abs(row["loss"] - ref) < 1e-4

    with pytest.raises(SaekitError, match="already holds"):
        finetune(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "ft"), progress=False)


def test_lr_decay_schedule():
    assert [ft.lr_factor(s, 10, 0.0) for s in range(10)] == [1.0] * 10
    f = [ft.lr_factor(s, 10, 0.4) for s in range(10)]
    assert f[:6] == [1.0] * 6 and f[6:] == [1.0, 0.75, 0.5, 0.25]  # linear over the last 4 steps, never 0
    assert [ft.lr_factor(s, 4, 1.0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_lr_decay_scales_every_group_and_leaves_old_identities(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    seen = []
    real = ft.train_step

    def record(ph, *a, **k):
        out = real(ph, *a, **k)
        seen.append([g["lr"] / g["base_lr"] for g in ph.opt.param_groups])
        return out

    monkeypatch.setattr(ft, "train_step", record)
    finetune(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "d", baseline=False, lr_decay=0.5), progress=False)
    assert len(seen) == 6 and all(len(set(r)) == 1 for r in seen)  # model, codes (and norms) alike
    assert [r[0] for r in seen] == [1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3]
    # A constant run's identity is the one it had before lr_decay existed, so its checkpoints still resume.
    const = _cfg(tiny_model_dir, tiny_text_file, tmp_path / "c")
    old_fields = tuple(f for f in ft.FINETUNE_IDENTITY if f != "lr_decay")
    assert ft.finetune_identity(const) == ft.runs.identity_hash(ft.to_dict(const), old_fields)
    assert ft.finetune_identity(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "c", lr_decay=0.2)) != ft.finetune_identity(const)
    with pytest.raises(ValueError, match="lr_decay"):
        _cfg(tiny_model_dir, tiny_text_file, tmp_path / "c", lr_decay=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("lr_decay", [0.0, 0.5])  # 0.5: the interruption falls inside the decay
def test_resume_gives_the_uninterrupted_result(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch, lr_decay):
    full = finetune(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "a", baseline=False, lr_decay=lr_decay), progress=False)

    real = ft.train_step
    calls = {"n": 0}

    def dies_at_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft, "train_step", dies_at_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "b", baseline=False, lr_decay=lr_decay), progress=False)
    monkeypatch.setattr(ft, "train_step", real)
    assert FinetunePaths(tmp_path / "b").checkpoint_steps("joint") == [2, 4]
    with pytest.raises(SaekitError, match="unfinished"):
        finetune(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "b", baseline=False, lr_decay=lr_decay), progress=False)
    with pytest.raises(SaekitError, match="other settings.*lr"):
        finetune(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "b", baseline=False, lr_decay=lr_decay, lr=5e-4, resume=True), progress=False)
    resumed = finetune(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "b", baseline=False, lr_decay=lr_decay, resume=True), progress=False)
    assert resumed.table == full.table
    for pa, pb in zip(sorted(full.codebooks), sorted(resumed.codebooks)):
        assert torch.equal(load(pa).codebook, load(pb).codebook)
    from safetensors.torch import load_file

    wa, wb = load_file(str(full.model / "model.safetensors")), load_file(str(resumed.model / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_freeze_model_trains_only_codes(tiny_model_dir, tiny_text_file, tmp_path):
    res = finetune(_cfg(tiny_model_dir, tiny_text_file, tmp_path / "f", freeze_model=True, codebooks="mlp[1]:k=2,codes=16"), progress=False)
    assert res.model == Path(tiny_model_dir)  # no model copy: the codebooks point at the original
    assert [r["model"] for r in res.table] == ["original", "codebook model"]
    d = load(res.codebooks[0])
    assert d.prov.model["name"] == tiny_model_dir
    assert not (tmp_path / "f" / "model").exists()


def test_codebook_layer_with_nothing_to_replace():
    """A batch of BOS only (first sampling step) passes through unchanged."""
    d = Codebook(DictConfig(kind="codebook", d_in=8, d_dict=4, k=1), Provenance(hook="blocks.0.hook_mlp_out"))
    layer = InModelCodebook(d)
    tok = torch.zeros(2, 1, dtype=torch.long)
    layer.mask = row_mask(tok, True)
    x = torch.randn(2, 1, 8)
    assert torch.equal(layer(x), x) and layer.last_commit.item() == 0


def test_saved_model_keeps_the_sources_extra_files_but_not_its_model_card(tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saekit.inmodel.model import save_hf_model

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "fsm.json").write_text("{}")
    (src / "README.md").write_text("# the source model")
    out = save_hf_model(AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src), str(src), tmp_path / "out")
    assert (out / "fsm.json").read_text() == "{}" and (out / "config.json").is_file()
    assert not (out / "README.md").exists()
