"""Offline explanations of features: the token rule that best predicts where a feature fires.

No language model is needed.  An explanation is a small set of *terms*, each either a
token (`"the"`: fires on that token) or a bigram (`"7" after "3"`: fires on `7` when the
token before it is `3`).  The terms' positions never overlap (a bigram is dropped when its
token is taken whole), so counts add up and the search is cheap:

1. One streaming pass counts, on two disjoint sets of sequences — the *build* set (the
   store's train split) and the *held-out* set (its eval split) — how often every bigram
   occurs (`n`) and, per feature, how often it occurs where the feature fires (`tp`).
   Only (feature, bigram) pairs that co-occur are kept, so memory grows with the number of
   distinct pairs, not with tokens × features.
2. On the build counts a greedy search adds, one at a time, the term (token or bigram)
   that raises the detection F1 = 2·TP / (N + P) most (P: positions where the feature
   fires, N: positions the explanation predicts), until no term raises it by `min_gain`
   or `max_terms` are used.  Terms must occur `min_support` times, so a rule never rests
   on one accident.
3. The explanation is then scored as a detector on the held-out counts only: precision
   TP/N, recall TP/P and F1 there are the explanation's score.

The same score applies to any explanation (a language model's, once turned into terms),
so explanations of different origin are comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

PAD = -1
_SHIFT = np.int64(32)
_LOW = np.int64((1 << 32) - 1)


def bigram_keys(tokens: np.ndarray) -> np.ndarray:
    """(n, ctx) int tokens → (n, ctx) int64 keys (prev + 1) << 32 | token (prev = PAD before position 0)."""
    tok = tokens.astype(np.int64)
    prev = np.full_like(tok, PAD)
    prev[:, 1:] = tok[:, :-1]
    return ((prev + 1) << _SHIFT) | (tok & _LOW)


def key_token(keys: np.ndarray) -> np.ndarray:
    """The current token of bigram keys."""
    return (keys & _LOW).astype(np.int64)


def key_prev(keys: np.ndarray) -> np.ndarray:
    """The previous token of bigram keys (PAD at a sequence's start)."""
    return (keys >> _SHIFT) - 1


def _reduce(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum `counts` over equal `keys` (both 1-D); keys come back sorted."""
    if keys.size == 0:
        return keys.astype(np.int64), counts.astype(np.int64)
    u, inv = np.unique(keys, return_inverse=True)
    return u, np.bincount(inv.ravel(), weights=counts, minlength=u.size).astype(np.int64)


def _reduce_pairs(feat: np.ndarray, keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum `counts` over equal (feature, key) pairs; sorted by feature, then key."""
    if feat.size == 0:
        e = np.zeros(0, np.int64)
        return e, e, e
    order = np.lexsort((keys, feat))
    f, k, c = feat[order], keys[order], counts[order]
    start = np.ones(f.size, bool)
    start[1:] = (f[1:] != f[:-1]) | (k[1:] != k[:-1])
    idx = np.flatnonzero(start)
    return f[idx], k[idx], np.add.reduceat(c, idx).astype(np.int64)


class SplitCounts:
    """Bigram and (feature, bigram) co-firing counts over one set of sequences."""

    # Merge the buffered per-batch pair counts once they hold this many entries.
    FLUSH = 1 << 22

    def __init__(self, d_dict: int):
        self.d = d_dict
        self.fires = np.zeros(d_dict, np.int64)
        self._keys: list[np.ndarray] = []
        self._kcounts: list[np.ndarray] = []
        self._pf: list[np.ndarray] = []
        self._pk: list[np.ndarray] = []
        self._pc: list[np.ndarray] = []
        self._buffered = 0

    def update(self, fired: Tensor | np.ndarray, keys: np.ndarray) -> None:
        """fired: (r, d_dict) bool for r counted positions; keys: (r,) their bigram keys."""
        fired_t = torch.as_tensor(fired).bool()
        rows, feats = fired_t.nonzero(as_tuple=True)
        rows, feats = rows.numpy(), feats.numpy().astype(np.int64)
        self.fires += np.bincount(feats, minlength=self.d)
        u, c = _reduce(keys, np.ones(keys.size, np.int64))
        self._keys.append(u)
        self._kcounts.append(c)
        if feats.size:
            # Pair keys within the batch: feature × (index of the bigram among this batch's).
            local = np.searchsorted(u, keys[rows])
            pk = feats * np.int64(u.size) + local
            pu, pc = np.unique(pk, return_counts=True)
            self._pf.append(pu // u.size)
            self._pk.append(u[pu % u.size])
            self._pc.append(pc.astype(np.int64))
            self._buffered += pu.size
        if self._buffered > self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        if len(self._pf) > 1:
            f, k, c = _reduce_pairs(np.concatenate(self._pf), np.concatenate(self._pk), np.concatenate(self._pc))
            self._pf, self._pk, self._pc = [f], [k], [c]
        if len(self._keys) > 1:
            k, c = _reduce(np.concatenate(self._keys), np.concatenate(self._kcounts))
            self._keys, self._kcounts = [k], [c]
        self._buffered = sum(x.size for x in self._pf)

    def finish(self) -> "Counts":
        """The merged counts."""
        self._flush()
        keys = self._keys[0] if self._keys else np.zeros(0, np.int64)
        kc = self._kcounts[0] if self._kcounts else np.zeros(0, np.int64)
        if self._pf:
            f, k, c = self._pf[0], self._pk[0], self._pc[0]
        else:
            f = k = c = np.zeros(0, np.int64)
        return Counts(self.fires.copy(), keys, kc, f, k, c)


@dataclass
class Counts:
    """Merged counts of one split (see `SplitCounts`)."""

    fires: np.ndarray
    """(d_dict,) positions where each feature fired."""
    keys: np.ndarray
    """(B,) sorted bigram keys seen."""
    key_n: np.ndarray
    """(B,) occurrences of each bigram."""
    pair_feat: np.ndarray
    """(C,) feature of each co-firing pair, sorted."""
    pair_key: np.ndarray
    """(C,) bigram key of each pair."""
    pair_tp: np.ndarray
    """(C,) positions with that bigram where the feature fired."""

    def __post_init__(self):
        self._token_n: dict[int, int] | None = None
        self._starts = np.searchsorted(self.pair_feat, np.arange(self.fires.size + 1)) if self.pair_feat.size else np.zeros(self.fires.size + 1, np.int64)

    def feature_pairs(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(bigram keys, tp) of feature f."""
        a, b = self._starts[f], self._starts[f + 1]
        return self.pair_key[a:b], self.pair_tp[a:b]

    def bigram_n(self, keys: np.ndarray) -> np.ndarray:
        """Occurrences of the given bigram keys (0 for unseen)."""
        idx = np.searchsorted(self.keys, keys)
        idx = np.minimum(idx, max(self.keys.size - 1, 0))
        hit = (self.keys.size > 0) & (self.keys[idx] == keys) if self.keys.size else np.zeros(keys.shape, bool)
        return np.where(hit, self.key_n[idx] if self.keys.size else 0, 0)

    def token_n(self, token: int) -> int:
        """Occurrences of a token (over all its bigrams)."""
        if self._token_n is None:
            toks = key_token(self.keys)
            u, c = _reduce(toks, self.key_n)
            self._token_n = dict(zip(u.tolist(), c.tolist()))
        return self._token_n.get(int(token), 0)


@dataclass(frozen=True)
class Term:
    """One part of an explanation: `token`, optionally only after `prev` (PAD = sequence start)."""

    token: int
    prev: int | None = None

    def matches(self, keys: np.ndarray) -> np.ndarray:
        """Which bigram keys this term covers."""
        hit = key_token(keys) == self.token
        if self.prev is not None:
            hit &= key_prev(keys) == self.prev
        return hit

    def describe(self, decode) -> str:
        tok = repr(decode(self.token))
        if self.prev is None:
            return tok
        return f"{tok} at the start" if self.prev == PAD else f"{tok} after {decode(self.prev)!r}"


@dataclass
class Score:
    """An explanation used as a detector of where the feature fires."""

    precision: float
    recall: float
    f1: float
    tp: int
    predicted: int
    fires: int


@dataclass
class Explanation:
    """A feature's explanation and its scores (held-out is the one to report)."""

    terms: list[Term]
    build: Score
    heldout: Score
    text: str = ""
    extra: dict = field(default_factory=dict)


def score_terms(terms: list[Term], counts: Counts, f: int) -> Score:
    """Precision, recall and F1 of `terms` as a detector of feature f on `counts`.

    Terms are disjoint by construction (`search`), so their counts add; a bigram whose token
    is also a whole term is counted once.
    """
    keys, tp = counts.feature_pairs(f)
    whole = {t.token for t in terms if t.prev is None}
    pairs = [t for t in terms if t.prev is not None and t.token not in whole]
    n = sum(counts.token_n(t) for t in whole)
    hit_tp = 0
    if keys.size:
        m = np.isin(key_token(keys), list(whole)) if whole else np.zeros(keys.size, bool)
        for t in pairs:
            m |= t.matches(keys)
        hit_tp = int(tp[m].sum())
    if pairs:
        pk = np.array([((t.prev + 1) << 32) | t.token for t in pairs], dtype=np.int64)
        n += int(counts.bigram_n(pk).sum())
    fires = int(counts.fires[f])
    prec = hit_tp / n if n else 0.0
    rec = hit_tp / fires if fires else 0.0
    f1 = 2 * hit_tp / (n + fires) if (n + fires) else 0.0
    return Score(prec, rec, f1, hit_tp, int(n), fires)


def search(counts: Counts, f: int, *, max_terms: int = 6, min_support: int = 3, min_gain: float = 0.005) -> list[Term]:
    """Greedy term set maximising F1 = 2·TP / (N + P) of feature f on `counts` (module docstring)."""
    P = int(counts.fires[f])
    keys, tp = counts.feature_pairs(f)
    if P == 0 or keys.size == 0:
        return []
    n = counts.bigram_n(keys)
    toks = key_token(keys)
    # Candidates: every token the feature fired on, and every bigram it fired on.
    tok_u, tok_tp = _reduce(toks, tp)
    tok_n = np.array([counts.token_n(t) for t in tok_u.tolist()], np.int64)
    chosen_tok: dict[int, tuple[int, int]] = {}  # token -> (tp, n)
    chosen_bi: dict[int, tuple[int, int, int]] = {}  # bigram key -> (token, tp, n)
    TP = N = 0
    best = 0.0
    for _ in range(max_terms):
        cand = None
        # Whole tokens (replacing any chosen bigrams of that token).
        for t, ttp, tn in zip(tok_u.tolist(), tok_tp.tolist(), tok_n.tolist()):
            if t in chosen_tok or tn < min_support:
                continue
            sub_tp = sum(v[1] for v in chosen_bi.values() if v[0] == t)
            sub_n = sum(v[2] for v in chosen_bi.values() if v[0] == t)
            f1 = 2 * (TP + ttp - sub_tp) / (N + tn - sub_n + P)
            if cand is None or f1 > cand[0]:
                cand = (f1, "tok", t, ttp, tn, sub_tp, sub_n)
        # Bigrams of tokens not taken whole.
        for k, btp, bn, t in zip(keys.tolist(), tp.tolist(), n.tolist(), toks.tolist()):
            if t in chosen_tok or k in chosen_bi or bn < min_support:
                continue
            f1 = 2 * (TP + btp) / (N + bn + P)
            if cand is None or f1 > cand[0]:
                cand = (f1, "bi", k, btp, bn, 0, 0)
        if cand is None or cand[0] - best < min_gain:
            break
        f1, kind, x, ctp, cn, sub_tp, sub_n = cand
        if kind == "tok":
            chosen_bi = {k: v for k, v in chosen_bi.items() if v[0] != x}
            chosen_tok[x] = (ctp, cn)
        else:
            chosen_bi[x] = (int(key_token(np.array([x]))[0]), ctp, cn)
        TP += ctp - sub_tp
        N += cn - sub_n
        best = f1
    terms = [Term(t) for t in chosen_tok]
    terms += [Term(v[0], int(key_prev(np.array([k]))[0])) for k, v in chosen_bi.items()]
    return terms


def describe(terms: list[Term], decode) -> str:
    """A one-line reading of an explanation, e.g. `'7' after '3' | 'the'`."""
    return " | ".join(t.describe(decode) for t in terms) if terms else "(no token rule found)"


def explain_all(build: Counts, heldout: Counts, decode, *, max_terms: int = 6, min_support: int = 3,
                min_gain: float = 0.005) -> list[Explanation]:
    """Search on `build`, score on `heldout`, for every feature."""
    out = []
    for f in range(build.fires.size):
        terms = search(build, f, max_terms=max_terms, min_support=min_support, min_gain=min_gain)
        out.append(Explanation(terms, score_terms(terms, build, f), score_terms(terms, heldout, f), describe(terms, decode)))
    return out


def share_explained(expls: list[Explanation], threshold: float = 0.5, *, min_heldout_fires: int = 1) -> float:
    """Share of features (that fire on held-out text) whose held-out F1 ≥ threshold."""
    scored = [e for e in expls if e.heldout.fires >= min_heldout_fires]
    if not scored:
        return math.nan
    return sum(e.heldout.f1 >= threshold for e in scored) / len(scored)


class ExplainPass:
    """Feed it the analyze pass's batches; it keeps build counts (train split) and held-out counts (eval split)."""

    def __init__(self, d_dict: int, eval_start: int):
        self.eval_start = eval_start
        self.build = SplitCounts(d_dict)
        self.heldout = SplitCounts(d_dict)

    def update(self, codes: Tensor, tokens: Tensor, mask: Tensor, seq_start: int) -> None:
        """codes (n, ctx, d_dict); tokens (n, ctx); mask (n, ctx) counted positions; seq_start global index."""
        tok = np.asarray(tokens.cpu())
        keys = bigram_keys(tok)
        m = mask.bool().cpu()
        is_eval = (torch.arange(tok.shape[0]) + seq_start >= self.eval_start)[:, None].expand_as(m)
        for part, sel in ((self.build, m & ~is_eval), (self.heldout, m & is_eval)):
            if sel.any():
                part.update(codes.cpu()[sel] != 0, keys[sel.numpy()])

    def explain(self, decode, **kw) -> list[Explanation]:
        return explain_all(self.build.finish(), self.heldout.finish(), decode, **kw)


def explain_neurons(store, hook: str, rate: float, decode, *, sample_rows: int = 50_000, batch_seqs: int = 64,
                    **kw) -> list[Explanation]:
    """Single neurons as the floor for dictionaries: neuron j fires where x_j is above its (1 - rate) quantile.

    The quantiles come from up to `sample_rows` counted rows of the train split, so each neuron fires on about
    `rate` of the tokens (pass a dictionary's typical feature frequency for a like-for-like floor); then the
    same build/held-out explanation pass as for features runs over the whole store.
    """
    if not 0 < rate < 1:
        raise ValueError(f"rate={rate} must be in (0, 1)")
    rows = []
    n = 0
    for _, toks, acts in store.iter_sequences([hook], "train", batch_seqs):
        x = torch.as_tensor(acts[hook]).float()[torch.as_tensor(store.row_mask(toks))]
        rows.append(x)
        n += len(x)
        if n >= sample_rows:
            break
    thr = torch.quantile(torch.cat(rows)[:sample_rows], 1.0 - rate, dim=0)  # (d,)
    ex = ExplainPass(int(thr.numel()), store.split("eval").start)
    for start, toks, acts in store.iter_sequences([hook], "all", batch_seqs):
        x = torch.as_tensor(acts[hook]).float()
        ex.update((x > thr).float(), torch.as_tensor(toks), torch.as_tensor(store.row_mask(toks)), start)
    return ex.explain(decode, **kw)
