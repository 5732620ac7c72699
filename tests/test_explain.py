"""Offline explanations: the search finds planted token rules, and scores come from held-out text only."""

import numpy as np
import pytest
import torch

from saekit.analysis.explain import (ExplainPass, SplitCounts, Term, bigram_keys, explain_all, score_terms, search,
                                     share_explained)


def _walks(seed, n=200, ctx=32, vocab=20):
    return np.random.default_rng(seed).integers(0, vocab, size=(n, ctx))


def _counts(tokens, fired):
    """Counts over every position but the first of each sequence (as BOS is excluded in a store)."""
    mask = np.ones(tokens.shape, bool)
    mask[:, 0] = False
    sc = SplitCounts(fired.shape[-1])
    sc.update(torch.as_tensor(fired[mask]), bigram_keys(tokens)[mask])
    return sc.finish()


def _brute(terms, tokens, fired, f):
    """Detection counts of `terms` by direct inspection of every counted position."""
    tp = pred = fires = 0
    for s in range(tokens.shape[0]):
        for p in range(1, tokens.shape[1]):
            hit = any(tokens[s, p] == t.token and (t.prev is None or tokens[s, p - 1] == t.prev) for t in terms)
            pred += hit
            fires += fired[s, p, f]
            tp += hit and fired[s, p, f]
    return tp, pred, fires


def test_planted_bigram_and_token_rules_recovered_with_f1_one():
    build, held = _walks(0), _walks(1)

    def fire(tok):
        prev = np.roll(tok, 1, axis=1)
        f0 = (tok == 7) & (prev == 3)  # "7 after 3"
        f1 = (tok == 5) | (tok == 11)  # "5 or 11"
        return np.stack([f0, f1], -1)

    expl = explain_all(_counts(build, fire(build)), _counts(held, fire(held)), str)
    assert {(t.prev, t.token) for t in expl[0].terms} == {(3, 7)}
    assert {(t.prev, t.token) for t in expl[1].terms} == {(None, 5), (None, 11)}
    for e in expl:
        assert e.heldout.f1 == pytest.approx(1.0)
        assert e.heldout.fires > 0
    assert "'7' after '3'" in expl[0].text
    assert share_explained(expl, 0.5) == 1.0


def test_score_is_computed_on_heldout_text_only():
    """A feature that fires on token 4 in the build text but on token 9 in the held-out text."""
    build, held = _walks(2), _walks(3)
    fb = (build == 4)[..., None]
    fh = (held == 9)[..., None]
    e = explain_all(_counts(build, fb), _counts(held, fh), str)[0]
    assert [(t.prev, t.token) for t in e.terms] == [(None, 4)]
    assert e.build.f1 == pytest.approx(1.0)
    assert e.heldout.f1 == 0.0 and e.heldout.fires > 0


def test_counts_and_scores_match_brute_force_on_noisy_features():
    rng = np.random.default_rng(4)
    tok = _walks(5, n=60, ctx=16, vocab=6)
    prev = np.roll(tok, 1, axis=1)
    noisy = ((tok == 2) & (rng.random(tok.shape) < 0.7)) | (rng.random(tok.shape) < 0.05)
    fired = np.stack([noisy, (tok == 1) & (prev == 0), rng.random(tok.shape) < 0.1], -1)
    counts = _counts(tok, fired)
    for f in range(3):
        terms = search(counts, f)
        s = score_terms(terms, counts, f)
        tp, pred, fires = _brute(terms, tok, fired, f)
        assert (s.tp, s.predicted, s.fires) == (tp, pred, fires)
        # also a hand-made mixed term set with an overlapping token and bigram
    mixed = [Term(2), Term(2, 0), Term(1, 0)]
    s = score_terms(mixed, counts, 0)
    assert (s.tp, s.predicted, s.fires) == _brute(mixed, tok, fired, 0)


def test_explain_pass_splits_sequences_at_the_eval_start():
    tok = _walks(6, n=20, ctx=8)
    codes = torch.as_tensor((tok == 3)[..., None].astype(np.float32))
    mask = torch.ones(tok.shape, dtype=torch.bool)
    mask[:, 0] = False
    ex = ExplainPass(1, eval_start=15)
    ex.update(codes[:10], torch.as_tensor(tok[:10]), mask[:10], 0)
    ex.update(codes[10:], torch.as_tensor(tok[10:]), mask[10:], 10)
    b, h = ex.build.finish(), ex.heldout.finish()
    assert b.fires[0] == int((tok[:15, 1:] == 3).sum())
    assert h.fires[0] == int((tok[15:, 1:] == 3).sum())
    assert int(b.key_n.sum()) == 15 * 7 and int(h.key_n.sum()) == 5 * 7


class _ArrayStore:
    """The store interface explain_neurons reads (iter_sequences, row_mask, split), over arrays."""

    def __init__(self, tokens, acts, n_eval):
        self.tokens, self.acts, self.n = tokens, acts, len(tokens)
        self.eval_start = self.n - n_eval

    def split(self, name):
        return {"train": range(0, self.eval_start), "eval": range(self.eval_start, self.n), "all": range(self.n)}[name]

    def row_mask(self, toks):
        m = np.ones(toks.shape, bool)
        m[:, 0] = False
        return m

    def iter_sequences(self, hooks, split, batch_seqs):
        r = self.split(split)
        for s in range(r.start, r.stop, batch_seqs):
            e = min(s + batch_seqs, r.stop)
            yield s, self.tokens[s:e], {hooks[0]: self.acts[s:e]}


def test_neuron_floor_explains_a_token_neuron_and_not_a_noise_neuron():
    from saekit.analysis.explain import explain_neurons

    rng = np.random.default_rng(7)
    tok = _walks(8, n=300, ctx=16, vocab=20)
    acts = rng.normal(0, 0.1, size=(*tok.shape, 2)).astype(np.float32)
    acts[..., 0] += 5.0 * (tok == 3)
    st = _ArrayStore(tok, acts, n_eval=100)
    e = explain_neurons(st, "h", 0.04, str)
    assert [(t.prev, t.token) for t in e[0].terms] == [(None, 3)]
    assert e[0].heldout.f1 > 0.8
    assert e[1].heldout.f1 < 0.3
