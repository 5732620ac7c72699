"""End-to-end dictionaries: identity SAE reproduces the model, training lowers KL, model stays frozen, CLI dispatch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saekit.inmodel import e2e
from saekit.config import from_flags
from saekit.inmodel.model import load_in_model
from saekit.inmodel.sites import Splicer
from saekit.tokens import PAD
from saekit.dictionaries import DictConfig, Provenance
from saekit.interop import load
from saekit.dictionaries.sae import ReluSAE
from saekit.errors import SaekitError

HOOK = "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def em(tiny_model_dir):
    im = load_in_model(tiny_model_dir, [HOOK], torch.device("cpu"))
    return e2e.E2EModel(im, Splicer(im.hf, list(im.sites.values())))


def _eval_tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(2, 41, (6, 16), generator=g)
    tok[:, 0] = 0
    tok[-1, 10:] = PAD  # a padded sequence: neither spliced nor scored
    return tok.numpy().astype(np.int32)


def test_identity_sae_reproduces_the_clean_model(em):
    """W_enc = [I, −I], W_dec = [I; −I]: x̂ = ReLU(x) − ReLU(−x) = x, so KL = 0 and CE is unchanged."""
    d_in = 32
    d = ReluSAE(DictConfig(kind="relu", d_in=d_in, d_dict=2 * d_in, l1=1.0), Provenance(hook=HOOK, scale=0.7))
    eye = torch.eye(d_in)
    with torch.no_grad():
        d.W_enc.copy_(torch.cat([eye, -eye], 1))
        d.W_dec.copy_(torch.cat([eye, -eye], 0))
        d.b_enc.zero_()
        d.b_dec.zero_()
    r = e2e.e2e_eval(em, d, HOOK, _eval_tokens(), 4, skip_bos=True)
    # float32 rounding alone: x·0.7/0.7 and the spliced forward's summation order differ from the
    # clean one's by ~1e-7 relative, which gives KL ~1e-9..1e-8 depending on the CPU's kernels.
    assert r["kl"] < 1e-7
    assert abs(r["ce_spliced"] - r["ce_clean"]) < 1e-5
    assert r["fvu"] < 1e-9
    assert r["eval_tokens"] == 5 * 15 + 9  # non-BOS, non-padding positions


def test_e2e_loss_gradient_reaches_only_the_spliced_side():
    torch.manual_seed(0)
    clean = torch.randn(2, 5, 7, requires_grad=True)
    spliced = torch.randn(2, 5, 7, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    e2e.e2e_loss(clean, spliced, mask).backward()
    assert clean.grad is None
    assert spliced.grad.abs().sum() > 0
    assert e2e.e2e_loss(clean, clean, mask).item() == pytest.approx(0, abs=1e-7)


@pytest.mark.slow
def test_e2e_training_lowers_kl_and_keeps_the_model_frozen(tiny_model_dir, tiny_text_file, tmp_path):
    from safetensors.torch import load_file

    before_w = load_file(f"{tiny_model_dir}/model.safetensors")
    cfg = from_flags(e2e.E2EConfig, model=tiny_model_dir, hooks=[HOOK], data=tiny_text_file, out=str(tmp_path / "d"), kind="topk",
                        d_dict=64, k=4, steps=40, lr=3e-3, batch_size=4, seq_len=16, eval_sequences=8, init_rows=512,
                        checkpoint_every=20, log_every=10)
    [path] = e2e.train_e2e(cfg, progress=False)
    d = load(path)
    s = d.summary
    assert s["objective"] == "e2e" and s["train_steps"] == 40
    assert s["kl"] < 0.8 * s["kl_before"], (s["kl_before"], s["kl"])
    assert 0 < s["l0"] <= 4
    assert d.prov.hook == HOOK and d.prov.model["fingerprint"]
    after_w = load_file(f"{tiny_model_dir}/model.safetensors")
    assert all(torch.equal(before_w[k], after_w[k]) for k in before_w)
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20, 30, 40]
    with pytest.raises(SaekitError, match="already holds"):
        e2e.train_e2e(cfg, progress=False)


def test_codebook_e2e_from_init_and_errors(tiny_model_dir, tiny_text_file, tmp_path):
    base = dict(model=tiny_model_dir, hooks=[HOOK], data=tiny_text_file, kind="codebook", d_dict=32, k=2, steps=4,
                batch_size=4, seq_len=16, eval_sequences=8, init_rows=256, log_every=2)
    [p0] = e2e.train_e2e(from_flags(e2e.E2EConfig, out=str(tmp_path / "a"), **base), progress=False)
    [p1] = e2e.train_e2e(from_flags(e2e.E2EConfig, out=str(tmp_path / "b"), init=str(p0), **base), progress=False)
    assert load(p1).summary["kl_before"] == pytest.approx(load(p0).summary["kl"], rel=1e-5)  # starts where p0 ended
    with pytest.raises(SaekitError, match="no dictionary for"):
        e2e.train_e2e(from_flags(e2e.E2EConfig, out=str(tmp_path / "c"), init=str(p0), **(base | {"hooks": ["blocks.1.hook_mlp_out"]})), progress=False)
    with pytest.raises(ValueError, match="kind .nonsense. is not one of"):  # DictConfig refuses it before the run config
        from_flags(e2e.E2EConfig, kind="nonsense")  # not a kind saekit trains


def test_batchtopk_training_reconstruction_keeps_k_per_row_on_average_and_learns_theta():
    from saekit.dictionaries.sae import BatchTopKSAE

    torch.manual_seed(0)
    d = BatchTopKSAE(DictConfig(kind="batchtopk", d_in=8, d_dict=32, k=3), Provenance(hook=HOOK, scale=2.0))
    rows = torch.randn(20, 8)
    assert d.threshold.item() < 0  # not estimated: inference would keep every positive pre-activation
    assert (d.encode(rows) != 0).sum(-1).float().mean() > 3
    x_hat, codes = e2e.training_reconstruction(d, rows)
    assert int((codes != 0).sum()) == 3 * 20  # k·n over the batch, not k per row
    smallest = codes[codes != 0].min().item()
    assert d.threshold.item() == pytest.approx(smallest)  # first estimate: the smallest kept value
    assert torch.allclose(x_hat, d.decode(codes))
    x_hat.sum().backward()
    assert d.W_enc.grad.abs().sum() > 0 and d.W_dec.grad.abs().sum() > 0
    # Inference with the estimated θ keeps exactly the pre-activations above it.
    pre = d.pre_acts(rows * 2.0)
    assert torch.equal(d.encode(rows) != 0, pre > d.threshold)


def test_batchtopk_e2e_from_scratch(tiny_model_dir, tiny_text_file, tmp_path):
    cfg = from_flags(e2e.E2EConfig, model=tiny_model_dir, hooks=[HOOK], data=tiny_text_file, out=str(tmp_path / "b"), kind="batchtopk",
                        d_dict=64, k=4, steps=6, lr=3e-3, batch_size=4, seq_len=16, eval_sequences=8, init_rows=256,
                        checkpoint_every=0, log_every=3)
    [path] = e2e.train_e2e(cfg, progress=False)
    assert path.name == "batchtopk-k4-e2e"
    d = load(path)
    assert d.cfg.kind == "batchtopk" and d.threshold.item() > 0
    # θ was estimated from k·n selections, so the held-out L0 lands near k (not the ~d_dict/2 of an unset θ).
    assert 0.25 * 4 < d.summary["l0"] < 4 * 4, d.summary["l0"]


@pytest.mark.slow
def test_saekit_train_objective_e2e(tiny_model_dir, tiny_text_file, tmp_path):
    """`saekit train --objective e2e` dispatches to saekit.inmodel.e2e and prints the train table from its summary."""
    from typer.testing import CliRunner

    from saekit_cli.main import app

    out = tmp_path / "t"
    res = CliRunner().invoke(app, ["train", "--objective", "e2e", "--model", tiny_model_dir, "--data", tiny_text_file,
                                   "--hook", HOOK, "--kind", "topk", "--k", "4", "--d-dict", "64", "--batch-size", "128",
                                   "--tokens", "384", "--init-rows", "256", "--out", str(out)])
    assert res.exit_code == 0, res.output
    [folder] = [p.parent for p in out.rglob("config.json")]
    assert folder.name == "topk-k4-e2e"
    d = load(folder)
    assert d.summary["objective"] == "e2e" and d.summary["train_steps"] == 3  # 384 tokens / 128 rows per step (1 sequence of up to 128)
    assert "FVU" in res.output


def test_saekit_train_objective_e2e_refuses_a_lower_precision(tiny_model_dir, tiny_text_file, tmp_path):
    """--precision is the offline Trainer's: e2e says so in one line instead of ignoring it, and writes nothing."""
    from typer.testing import CliRunner

    from saekit_cli.main import app

    out = tmp_path / "t"
    res = CliRunner().invoke(app, ["train", "--objective", "e2e", "--model", tiny_model_dir, "--data", tiny_text_file,
                                   "--hook", HOOK, "--kind", "topk", "--k", "4", "--d-dict", "64", "--batch-size", "128",
                                   "--tokens", "384", "--precision", "bf16", "--out", str(out)])
    from saekit.errors import SaekitError

    assert isinstance(res.exception, SaekitError)  # `saekit` (cli.main) prints it as one `error:` line, exit 2
    assert "--precision bf16 is for offline training" in str(res.exception)
    assert not list(out.rglob("config.json"))
