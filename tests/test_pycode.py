"""The pycode text model: corpus split, count baselines, a tiny training run, and the shipped model's quality."""

import json

import numpy as np
import pytest
import torch

from saekit.pycode import corpus
from saekit.pycode.train import EOT_ID, PyTrainConfig, baselines, batch, heldout_windows, train_pycode
from saekit.config import from_flags


def test_corpus_splits_are_disjoint_and_fixed_by_path():
    tr, ho = corpus.files("train"), corpus.files("heldout")
    assert tr and ho
    assert not {r for r, _ in tr} & {r for r, _ in ho}
    assert len(tr) + len(ho) == len(corpus.files("all"))
    assert all(corpus.split_of(r) == "heldout" for r, _ in ho)
    assert not any("site-packages" in r or r.startswith("test/") for r, _ in tr + ho)


def test_data_file_is_harvestable_jsonl(tmp_path):
    from saekit.pycode.corpus import PyDataConfig, write_jsonl
    from saekit.text import iter_documents

    out, n = write_jsonl(PyDataConfig(out=str(tmp_path / "py.jsonl"), split="heldout", max_docs=3))
    assert n == 3
    assert list(iter_documents([out])) == corpus.documents("heldout")[:3]


def test_baselines_equal_brute_force_counts():
    rng = np.random.default_rng(0)
    V = 7
    train = rng.integers(0, V, 500).astype(np.int32)
    windows = torch.as_tensor(rng.integers(0, V, (5, 9)))
    b = baselines(train, windows, V)
    uni = (np.bincount(train, minlength=V) + 1.0) / (len(train) + V)
    big = np.zeros((V, V))
    for a, c in zip(train[:-1], train[1:]):
        big[a, c] += 1
    cond = big / big.sum(1, keepdims=True)
    w = windows.numpy()
    prev, nxt = w[:, :-1].ravel(), w[:, 1:].ravel()
    lam = b["bigram_lambda"]
    assert b["unigram_loss"] == pytest.approx(-np.log(uni[nxt]).mean())
    assert b["bigram_loss"] == pytest.approx(-np.log(lam * cond[prev, nxt] + (1 - lam) * uni[nxt]).mean())
    assert b["bigram_accuracy"] == pytest.approx((cond.argmax(1)[prev] == nxt).mean())


def test_batches_are_seeded_and_start_with_bos():
    s = np.arange(1000, dtype=np.int32) + 1
    a, b = batch(s, 4, 16, 0, 3), batch(s, 4, 16, 0, 3)
    assert torch.equal(a, b) and not torch.equal(a, batch(s, 4, 16, 0, 4))
    assert (a[:, 0] == EOT_ID).all() and (a[:, 2:] - a[:, 1:-1] == 1).all()
    w = heldout_windows(s, 16, 64)
    assert w.shape == (4, 16) and (w[:, 0] == EOT_ID).all() and w[1, 1] == s[15]


def test_tiny_training_run_loads_through_the_bridge(tmp_path, monkeypatch):
    from saekit.models import load_model

    full = corpus.documents
    monkeypatch.setattr(corpus, "documents", lambda split="all", root=None: full(split, root)[:8])
    cfg = from_flags(PyTrainConfig, out=str(tmp_path / "m"), steps=30, eval_every=0, eval_tokens=2000, vocab_size=400, batch_size=8, ctx=32,
                        d_model=32, n_head=2, d_mlp=64, n_layer=1, lr=1e-2, warmup=5)
    out, r = train_pycode(cfg)
    first = json.loads((out / "pycode_train.json").read_text())
    assert r.loss < np.log(cfg.vocab_size) - 0.5  # it learnt: well below a uniform guess
    lm = load_model(str(out))
    ids = lm.tokenizer("def f(x):\n    return x\n", add_special_tokens=False)["input_ids"]
    t = torch.tensor([[EOT_ID] + ids])
    hf = __import__("transformers").GPT2LMHeadModel.from_pretrained(str(out))
    assert torch.allclose(lm.bridge(t).float(), hf(t).logits.float(), atol=1e-4)
    assert first["config"]["lm"]["steps"] == 30 and not (tmp_path / "m.partial").exists()


@pytest.mark.slow
def test_shipped_model_beats_the_bigram_baseline_offline(monkeypatch):
    from saekit.models import load_model
    from saekit.pycode.train import token_stream

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model("pycode")
    tok = lm.tokenizer
    train = token_stream(tok, corpus.documents("train"))
    windows = heldout_windows(token_stream(tok, corpus.documents("heldout")), lm.info.n_ctx, 20_000)
    base = baselines(train, windows, lm.info.d_vocab)
    with torch.no_grad():
        logits = lm.bridge(windows).float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()
    assert loss < base["bigram_loss"]
