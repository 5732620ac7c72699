"""The toy FSM language: generation, labels, exact entropies, text form, and a toy model trained in seconds."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from saekit.errors import SaekitError
from saekit.toy.fsm import (
    BOS_ID, FSM, generate, labels_from_tokens, load_fsm, optimum_loss, position_entropies, to_text,
    transition_accuracy, unigram_entropy,
)


def test_fsm_is_seeded_and_well_formed():
    a, b, c = FSM.random(30, 4, 2, seed=1), FSM.random(30, 4, 2, seed=1), FSM.random(30, 4, 2, seed=2)
    assert (a.successors == b.successors).all() and not (a.successors == c.successors).all()
    assert a.successors.shape == (30, 4)
    assert all(len(set(row)) == 4 for row in a.successors.tolist())
    assert a.successors.min() >= 0 and a.successors.max() < 30
    assert (a.valid_mask().sum(1) == 4).all()
    # Round trip through JSON.
    d = FSM.from_dict(json.loads(json.dumps(a.to_dict())))
    assert (d.successors == a.successors).all() and d.digits == 2


def test_fsm_refuses_impossible_shapes():
    with pytest.raises(ValueError, match="digits"):
        FSM.random(101, 3, 2)
    with pytest.raises(ValueError, match="out_degree"):
        FSM.random(5, 6, 1)


def test_generated_sequences_are_walks_with_consistent_labels():
    fsm = FSM.random(40, 5, 2, seed=3)
    tokens, lab = generate(fsm, 50, 21, seed=7)  # 20 digits = 10 full states
    assert tokens.shape == (50, 21) and (tokens[:, 0] == BOS_ID).all() and (tokens[:, 1:] < 10).all()
    assert (generate(fsm, 50, 21, seed=7)[0] == tokens).all()
    assert not (generate(fsm, 50, 21, seed=8)[0] == tokens).all()
    # Digits spell the labelled state; complete exactly on the last digit.
    digs = fsm.state_digits()
    for i, t in itertools.product(range(50), range(1, 21)):
        s, j = lab.state[i, t], lab.digit[i, t]
        assert tokens[i, t] == digs[s, j]
        assert lab.complete[i, t] == (j == 1)
        assert set(lab.next_states[i, t]) == set(fsm.successors[s])
    # Consecutive states are allowed steps.
    states = lab.state[:, 2::2]
    assert fsm.valid_mask()[states[:, :-1], states[:, 1:]].all()
    assert transition_accuracy(fsm, tokens) == (1.0, 50 * 9)
    # Recovering labels from tokens alone gives the same answer.
    rec = labels_from_tokens(fsm, tokens)
    for a, b in zip(rec, lab):
        assert (a == b).all()


def test_labels_from_padded_and_partial_tokens():
    fsm = FSM.random(40, 5, 2, seed=3)
    tokens, lab = generate(fsm, 6, 12, seed=0)  # 11 digits: 5 full states and one partial
    padded = tokens.copy()
    padded[0, 8:] = -1  # 7 digits kept: 3 full states, then a partial one
    rec = labels_from_tokens(fsm, padded)
    assert rec.complete[0].tolist() == lab.complete[0, :8].tolist() + [False] * 4
    assert (rec.state[0, 7] == -1) and (rec.state[0, 6] == lab.state[0, 6])
    assert (rec.complete[1:] == lab.complete[1:]).all()
    assert not rec.complete[:, 11].any()  # the partial last state is never complete


def test_labels_from_tokens_refuses_other_text():
    fsm = FSM.random(40, 5, 2, seed=3)
    tokens, _ = generate(fsm, 4, 11, seed=0)
    bad = tokens.copy()
    bad[:, 0] = 3
    with pytest.raises(SaekitError, match="BOS"):
        labels_from_tokens(fsm, bad)
    other = FSM.random(40, 5, 2, seed=99)
    with pytest.raises(SaekitError, match="another FSM"):
        labels_from_tokens(other, tokens)
    big = tokens.copy()
    big[:, 1] = 9  # state 9x >= 40 states
    with pytest.raises(SaekitError, match="names a state"):
        labels_from_tokens(fsm, big)


def _brute_force_entropies(fsm: FSM, ctx: int):
    """Enumerate every walk prefix: exact E[H(next | history)] per position and the unigram entropy."""
    n_walk = ctx - 1
    n_k = -(-n_walk // fsm.digits)
    digs = fsm.state_digits()
    seq_p = defaultdict(float)
    for walk in itertools.product(range(fsm.n_states), repeat=n_k):
        p = 1.0 / fsm.n_states
        for a, b in zip(walk, walk[1:]):
            p *= (b in fsm.successors[a]) / fsm.out_degree
        if p == 0:
            continue
        seq = tuple(int(d) for s in walk for d in digs[s])[:n_walk]
        seq_p[seq] += p
    prefix_p = defaultdict(float)
    for seq, p in seq_p.items():
        for t in range(n_walk + 1):
            prefix_p[seq[:t]] += p
    ent = np.zeros(n_walk)
    freq = np.zeros(10)
    for seq, p in seq_p.items():
        for t in range(n_walk):
            ent[t] -= p * math.log(prefix_p[seq[: t + 1]] / prefix_p[seq[:t]])
            freq[seq[t]] += p
    q = freq / freq.sum()
    q = q[q > 0]
    return ent, float(-(q * np.log(q)).sum())


@pytest.mark.parametrize("ctx", [7, 8])  # 6 digits = 3 full states; 7 digits ends in a partial state
def test_exact_entropies_match_brute_force(ctx):
    fsm = FSM.random(12, 3, 2, seed=5)
    ent, uni = _brute_force_entropies(fsm, ctx)
    np.testing.assert_allclose(position_entropies(fsm, ctx), ent, atol=1e-12)
    assert optimum_loss(fsm, ctx) == pytest.approx(ent.mean(), abs=1e-12)
    assert unigram_entropy(fsm, ctx) == pytest.approx(uni, abs=1e-12)


def test_optimum_by_chain_rule_for_whole_states():
    fsm = FSM.random(100, 10, 2, seed=0)
    ctx = 129  # 64 whole states: log(100) for the first, log(10) for each of the other 63
    expected = (math.log(100) + 63 * math.log(10)) / 128
    assert optimum_loss(fsm, ctx) == pytest.approx(expected, rel=1e-12)
    assert optimum_loss(fsm, ctx) < unigram_entropy(fsm, ctx) <= math.log(10)


def test_transition_accuracy_counts_invalid_steps():
    fsm = FSM.random(10, 2, 1, seed=0)
    tokens, lab = generate(fsm, 1, 11, seed=0)  # 10 states, 9 steps
    bad = tokens.copy()
    s = lab.state[0, 5]
    bad[0, 6] = next(t for t in range(10) if t not in fsm.successors[s])  # breaks steps 5→6 and maybe 6→7
    acc, n = transition_accuracy(fsm, bad)
    expected_bad = 1 + int(lab.state[0, 7] not in fsm.successors[bad[0, 6]])
    assert n == 9 and acc == pytest.approx((9 - expected_bad) / 9)
    bad[0, 9] = BOS_ID  # a non-digit ends the reading and counts as one invalid step
    acc2, n2 = transition_accuracy(fsm, bad)
    assert n2 == 7 + 1


def test_text_form_round_trips_through_the_tokenizer():
    from saekit.toy.train import make_tokenizer

    fsm = FSM.random(100, 10, 2, seed=0)
    tokens, _ = generate(fsm, 5, 30, seed=0)
    tok = make_tokenizer()
    assert len(tok) == 11 and tok.bos_token_id == BOS_ID == tok.eos_token_id
    for line, row in zip(to_text(tokens), tokens):
        assert len(line) == 29
        assert tok(line)["input_ids"] == row[1:].tolist()


def test_a_tiny_toy_trains_in_seconds_and_loads_through_transformer_lens(tmp_path):
    from transformers import GPT2LMHeadModel

    from saekit.models import load_model
    from saekit.toy.train import ToyTrainConfig, train_toy
    from saekit.config import from_flags

    cfg = from_flags(ToyTrainConfig, 
        out=str(tmp_path / "toy"), n_states=10, out_degree=2, digits=1, ctx=24, n_layer=1, d_model=32, n_head=2,
        d_mlp=64, batch_size=16, steps=100, lr=1e-2, warmup=10, eval_every=0, eval_seqs=16, threads=1,
    )
    seen = []
    threads = torch.get_num_threads()
    out, res = train_toy(cfg, progress=lambda step, info: seen.append(step))
    assert torch.get_num_threads() == threads  # cfg.threads applies to the training only
    assert seen == list(range(1, 101))
    assert res.optimum < res.unigram
    # Well below the unigram plateau: at least half-way from it to the optimum.
    assert res.loss < res.unigram - 0.5 * (res.unigram - res.optimum), res
    for f in ("config.json", "model.safetensors", "tokenizer.json", "fsm.json", "README.md", "toy_train.json"):
        assert (out / f).is_file(), f
    assert not (tmp_path / "toy.partial").exists()
    assert load_fsm(out).n_states == 10

    loaded = load_model(str(out))
    tokens, _ = generate(load_fsm(out), 2, 24, seed=0)
    t = torch.from_numpy(tokens)
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.bridge(t), hf(input_ids=t).logits, atol=1e-4, rtol=1e-4)
    assert loaded.bos_id == BOS_ID

    with pytest.raises(SaekitError, match="--overwrite"):
        train_toy(cfg)


def test_shipped_toy_model_loads_and_knows_the_fsm():
    """`toy` resolves to the shipped directory; one forward on fresh walks is far below the unigram plateau."""
    from saekit.metrics import ce_per_token
    from saekit.models import load_model
    from saekit.toy import pretrained_dir

    if not (pretrained_dir() / "model.safetensors").is_file():
        pytest.fail("the shipped toy model is missing from saekit/toy/pretrained/")
    fsm = load_fsm("toy")
    loaded = load_model("toy")
    ctx = loaded.info.n_ctx
    tokens, _ = generate(fsm, 8, ctx, seed=123)
    with torch.no_grad():
        logits = loaded.bridge(torch.from_numpy(tokens))
    ce = ce_per_token(logits, torch.from_numpy(tokens)).mean().item()
    opt, uni = optimum_loss(fsm, ctx), unigram_entropy(fsm, ctx)
    assert ce < opt + 0.1 * (uni - opt), (ce, opt, uni)
    summary = json.loads((pretrained_dir() / "toy_train.json").read_text())
    assert summary["result"]["transition_accuracy"] >= 0.95


def test_cli_train_refuses_an_occupied_out_in_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "saekit_cli.main", "toy", "train", "--out", str(tmp_path / "taken"), "--steps", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "--overwrite" in r.stderr
    assert (tmp_path / "taken" / "x").read_text() == "keep me"


def test_fsm_from_a_transition_matrix_file_gives_the_same_transitions(tmp_path):
    from saekit.toy.fsm import load_matrix

    fsm = FSM.random(30, 4, 2, seed=3)
    P = fsm.transition_matrix()  # the Codebook Features library's fsm.npy layout: (S, S) float, 1/k per successor
    np.save(tmp_path / "fsm.npy", P)
    back = load_matrix(tmp_path / "fsm.npy")
    assert (back.n_states, back.out_degree, back.digits) == (30, 4, 2)
    assert np.array_equal(back.successors, fsm.successors)
    assert np.array_equal(back.transition_matrix(), P)
    # The same walks from the same seed.
    assert np.array_equal(generate(back, 3, 21, seed=0)[0], generate(fsm, 3, 21, seed=0)[0])


@pytest.mark.parametrize("make, match", [
    (lambda P: P[:5], "shape"),
    (lambda P: P.astype(np.int64), "dtype"),
    (lambda P: np.where(P > 0, P * 2, P), "sums to"),
    (lambda P: np.concatenate([P[:, :-1], P[:, -1:] * np.nan], 1), "NaN"),
    (lambda P: _uneven(P), "different numbers of successors"),
])
def test_fsm_matrix_file_refuses_other_layouts(tmp_path, make, match):
    from saekit.toy.fsm import load_matrix

    P = FSM.random(12, 3, 2, seed=1).transition_matrix()
    np.save(tmp_path / "bad.npy", make(P))
    with pytest.raises(SaekitError, match=match):
        load_matrix(tmp_path / "bad.npy")


def _uneven(P):
    Q = P.copy()
    Q[0] = 0.0
    Q[0, :2] = 0.5
    return Q


def test_fsm_matrix_file_is_read_without_pickle(tmp_path):
    from saekit.toy.fsm import load_matrix

    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SaekitError, match="not a readable .npy"):
        load_matrix(tmp_path / "obj.npy")


def test_gpt_neox_toy_from_a_matrix_file_trains_and_loads_through_the_bridge(tmp_path):
    from transformers import GPTNeoXForCausalLM

    from saekit.models import load_model
    from saekit.toy.train import ToyTrainConfig, train_toy
    from saekit.config import from_flags

    fsm = FSM.random(10, 2, 1, seed=5)
    np.save(tmp_path / "fsm.npy", fsm.transition_matrix())
    cfg = from_flags(ToyTrainConfig, out=str(tmp_path / "neox"), fsm=str(tmp_path / "fsm.npy"), digits=1, arch="gpt-neox", ctx=24, n_layer=1,
                         d_model=32, n_head=2, d_mlp=64, batch_size=16, steps=60, lr=1e-2, warmup=10, eval_every=0, eval_seqs=16,
                         threads=1)
    out, res = train_toy(cfg)
    assert np.array_equal(load_fsm(out).successors, fsm.successors)
    assert res.loss < res.unigram
    assert "GPT-NeoX" in (out / "README.md").read_text()
    loaded = load_model(str(out))
    t = torch.from_numpy(generate(fsm, 2, 24, seed=0)[0])
    hf = GPTNeoXForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.bridge(t), hf(input_ids=t).logits, atol=1e-4, rtol=1e-4)
