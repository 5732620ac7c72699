"""Streaming feature statistics: one pass over (tokens, codes) batches, memory bounded.

`FeatureStats` keeps, per feature, only fixed-size state whatever the number of tokens:
fire count, sums, max, an activation histogram and the top-N activating positions with
the token window around each.  So `saekit analyze` can read a store of any size once.

- Top-N contexts: a running `torch.topk` merge.  Each batch's best N rows per feature are
  concatenated with the N kept so far and cut back to N, carrying (seq, pos), the token
  window and the feature's activation over that window along.  State: (d_dict, N, 2w+1).
- Sampled contexts: S firings per feature drawn uniformly at random without replacement
  (bottom-S of a random key per firing, merged like the top N), so the dashboard can show
  contexts across the whole activation range, not only the strongest (SAEDashboard's
  interval groups).
- Histogram: a fixed number of equal bins over [0, R_f) per feature, R_f a power of two
  above the largest activation so far; when a larger one arrives R_f is multiplied by
  2^m and bins are merged (exact: old bin i lands in new bin i // 2^m).  So the range adapts to each feature without a second pass.
- Logit effects (`logit_effects`): a decoder direction pushed through the model's
  unembedding says which next tokens the feature promotes or suppresses directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saekit.tokens import PAD


@dataclass
class StatsResult:
    """Per-feature results of a streaming pass (tensors on CPU; d = d_dict, N = top_n)."""

    n_rows: int
    """Counted token positions seen."""
    count: Tensor
    """(d,) int64: positions where the feature was non-zero."""
    act_sum: Tensor
    """(d,) float64: sum of its activation over those positions."""
    act_max: Tensor
    """(d,) float32: largest activation (0 for dead features)."""
    hist: Tensor
    """(d, bins) int64: activation histogram over [0, hist_max) in equal bins."""
    hist_max: Tensor
    """(d,) float32: upper edge of each feature's histogram."""
    top_values: Tensor
    """(d, N) float32: the N largest activations, descending (0 where fewer fired)."""
    top_seq: Tensor
    """(d, N) int64: global sequence index of each (-1 where empty)."""
    top_pos: Tensor
    """(d, N) int64: position in that sequence."""
    window_tokens: Tensor
    """(d, N, 2w+1) int32: tokens around each hit (PAD = -1 outside the sequence)."""
    window_acts: Tensor
    """(d, N, 2w+1) float32: the feature's activation on those tokens."""
    sample_values: Tensor | None = None
    """(d, S) float32: activations at S firings drawn uniformly at random (0 where fewer fired)."""
    sample_seq: Tensor | None = None
    """(d, S) int64 (-1 where empty)."""
    sample_pos: Tensor | None = None
    sample_tokens: Tensor | None = None
    """(d, S, 2w+1) int32: tokens around each sampled firing."""
    sample_acts: Tensor | None = None

    @property
    def frequency(self) -> Tensor:
        """(d,) share of counted positions where the feature fired."""
        return self.count.double() / max(self.n_rows, 1)

    @property
    def act_mean(self) -> Tensor:
        """(d,) mean activation over the positions where it fired (0 for dead features)."""
        return (self.act_sum / self.count.clamp_min(1)).float()


class FeatureStats:
    """Accumulate per-feature statistics batch by batch (see the module docstring).

    Call `update(codes, tokens, mask, seq_start)` with dense codes laid out per position,
    then `result()`.  Memory: O(d_dict · (bins + N · (2·window+1))), independent of the
    number of tokens.
    """

    def __init__(self, d_dict: int, *, top_n: int = 20, window: int = 8, bins: int = 32, samples: int = 0, seed: int = 0):
        self.d, self.N, self.w, self.B, self.S = d_dict, top_n, window, bins, samples
        W = 2 * window + 1
        self.n_rows = 0
        self.count = torch.zeros(d_dict, dtype=torch.int64)
        self.act_sum = torch.zeros(d_dict, dtype=torch.float64)
        self.act_max = torch.zeros(d_dict)
        self.hist = torch.zeros(d_dict, bins, dtype=torch.int64)
        self.hist_max = torch.zeros(d_dict)
        self.top_values = torch.full((d_dict, top_n), float("-inf"))
        self.top_seq = torch.full((d_dict, top_n), -1, dtype=torch.int64)
        self.top_pos = torch.full((d_dict, top_n), -1, dtype=torch.int64)
        self.window_tokens = torch.full((d_dict, top_n, W), PAD, dtype=torch.int32)
        self.window_acts = torch.zeros(d_dict, top_n, W)
        self.gen = torch.Generator().manual_seed(seed)
        self.s_key = torch.full((d_dict, samples), float("-inf"))  # −key: the S largest are the S smallest keys
        self.s_values = torch.zeros(d_dict, samples)
        self.s_seq = torch.full((d_dict, samples), -1, dtype=torch.int64)
        self.s_pos = torch.full((d_dict, samples), -1, dtype=torch.int64)
        self.s_tokens = torch.full((d_dict, samples, W), PAD, dtype=torch.int32)
        self.s_acts = torch.zeros(d_dict, samples, W)

    @torch.no_grad()
    def update(self, codes: Tensor, tokens: Tensor, mask: Tensor, seq_start: int) -> None:
        """Add one batch.

        codes: (n_seq, ctx, d_dict) dense codes (values at positions outside `mask` are ignored);
        tokens: (n_seq, ctx) token ids; mask: (n_seq, ctx) bool, the counted positions;
        seq_start: global index of the batch's first sequence.
        """
        codes = codes.float().cpu()
        mask = mask.bool().cpu()
        tokens = tokens.cpu()
        codes = codes * mask[..., None]  # (n, ctx, d): uncounted positions never win a top slot
        n, ctx, d = codes.shape
        self.n_rows += int(mask.sum())
        self._moments(codes[mask])
        self._top(codes, tokens, seq_start)
        if self.S:
            self._sample(codes, tokens, seq_start)

    def _moments(self, rows: Tensor) -> None:
        """Counts, sums, max and histogram from the non-zero entries of rows (r, d)."""
        r, f = rows.nonzero(as_tuple=True)
        if f.numel() == 0:
            return
        v = rows[r, f]
        self.count += torch.bincount(f, minlength=self.d)
        self.act_sum.index_add_(0, f, v.double())
        bmax = torch.zeros(self.d).scatter_reduce(0, f, v, reduce="amax", include_self=True)
        self.act_max = torch.maximum(self.act_max, bmax)
        self._grow_hist(bmax)
        b = (v.clamp_min(0) / self.hist_max[f] * self.B).long().clamp(0, self.B - 1)
        self.hist.view(-1).index_add_(0, f * self.B + b, torch.ones_like(b))

    def _grow_hist(self, bmax: Tensor) -> None:
        """Make every feature's range cover `bmax`, doubling it and merging bins (exact).

        Ranges are powers of two strictly above the largest value seen, so bins are
        half-open [lo, hi) throughout and doubling is exact in floating point.
        """
        need = bmax > 0
        target = torch.pow(2.0, torch.floor(torch.log2(bmax.clamp_min(1e-30))) + 1)  # (d,) smallest 2^j > bmax
        fresh = need & (self.hist_max == 0)
        self.hist_max[fresh] = target[fresh]
        over = need & (bmax >= self.hist_max)
        if not over.any():
            return
        factor = (target[over] / self.hist_max[over]).round().long()  # a power of two >= 2
        idx = torch.arange(self.B)[None, :] // factor[:, None]  # (n_over, B): old bin -> new bin
        merged = torch.zeros(int(over.sum()), self.B, dtype=torch.int64).scatter_add_(1, idx, self.hist[over])
        self.hist[over] = merged
        self.hist_max[over] = target[over]

    def _windows(self, codes: Tensor, tokens: Tensor, s: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens and the feature's activations in a ±w window around positions (s, p), each (d, k)."""
        n, ctx, d = codes.shape
        offs = torch.arange(-self.w, self.w + 1)
        pw = p[..., None] + offs  # (d, k, W)
        inside = (pw >= 0) & (pw < ctx)
        pwc = pw.clamp(0, ctx - 1)
        sw = s[..., None].expand_as(pw)
        feat = torch.arange(d)[:, None, None].expand_as(pw)
        wtok = torch.where(inside, tokens[sw, pwc].to(torch.int32), torch.tensor(PAD, dtype=torch.int32))
        wact = torch.where(inside, codes[sw, pwc, feat], torch.tensor(0.0))
        return wtok, wact

    def _sample(self, codes: Tensor, tokens: Tensor, seq_start: int) -> None:
        """Merge this batch's firings into the uniform sample: keep the S smallest random keys per feature."""
        n, ctx, d = codes.shape
        flat = codes.reshape(n * ctx, d).T  # (d, n·ctx)
        keys = torch.rand(flat.shape, generator=self.gen)
        score = torch.where(flat > 0, -keys, torch.tensor(float("-inf")))
        k = min(self.S, n * ctx)
        sc, rows = torch.topk(score, k, dim=1)  # (d, k)
        s, p = rows // ctx, rows % ctx
        wtok, wact = self._windows(codes, tokens, s, p)
        all_k = torch.cat([self.s_key, sc], 1)
        keep = torch.topk(all_k, self.S, dim=1).indices
        self.s_key = all_k.gather(1, keep)
        self.s_values = torch.cat([self.s_values, flat.gather(1, rows)], 1).gather(1, keep)
        self.s_seq = torch.cat([self.s_seq, s + seq_start], 1).gather(1, keep)
        self.s_pos = torch.cat([self.s_pos, p], 1).gather(1, keep)
        kw = keep[..., None].expand(-1, -1, 2 * self.w + 1)
        self.s_tokens = torch.cat([self.s_tokens, wtok], 1).gather(1, kw)
        self.s_acts = torch.cat([self.s_acts, wact], 1).gather(1, kw)

    def _top(self, codes: Tensor, tokens: Tensor, seq_start: int) -> None:
        """Merge this batch's best N positions per feature into the kept top N."""
        n, ctx, d = codes.shape
        flat = codes.reshape(n * ctx, d).T  # (d, n·ctx)
        k = min(self.N, n * ctx)
        vals, rows = torch.topk(flat, k, dim=1)  # (d, k)
        s, p = rows // ctx, rows % ctx
        wtok, wact = self._windows(codes, tokens, s, p)
        all_v = torch.cat([self.top_values, vals], 1)
        keep = torch.topk(all_v, self.N, dim=1).indices  # (d, N)
        cat_seq = torch.cat([self.top_seq, s + seq_start], 1)
        cat_pos = torch.cat([self.top_pos, p], 1)
        self.top_values = all_v.gather(1, keep)
        self.top_seq = cat_seq.gather(1, keep)
        self.top_pos = cat_pos.gather(1, keep)
        kw = keep[..., None].expand(-1, -1, 2 * self.w + 1)
        self.window_tokens = torch.cat([self.window_tokens, wtok], 1).gather(1, kw)
        self.window_acts = torch.cat([self.window_acts, wact], 1).gather(1, kw)

    def result(self) -> StatsResult:
        """The statistics so far; slots where a feature never fired are emptied (value 0, seq -1)."""
        empty = ~(self.top_values > 0)
        s_empty = ~torch.isfinite(self.s_key)
        return StatsResult(
            n_rows=self.n_rows,
            count=self.count.clone(),
            act_sum=self.act_sum.clone(),
            act_max=self.act_max.clone(),
            hist=self.hist.clone(),
            hist_max=self.hist_max.clone(),
            top_values=self.top_values.masked_fill(empty, 0.0),
            top_seq=self.top_seq.masked_fill(empty, -1),
            top_pos=self.top_pos.masked_fill(empty, -1),
            window_tokens=self.window_tokens.masked_fill(empty[..., None], PAD),
            window_acts=self.window_acts.masked_fill(empty[..., None], 0.0),
            sample_values=self.s_values.masked_fill(s_empty, 0.0),
            sample_seq=self.s_seq.masked_fill(s_empty, -1),
            sample_pos=self.s_pos.masked_fill(s_empty, -1),
            sample_tokens=self.s_tokens.masked_fill(s_empty[..., None], PAD),
            sample_acts=self.s_acts.masked_fill(s_empty[..., None], 0.0),
        )


def decoder_neighbours(directions: Tensor, n: int = 5, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Each feature's `n` nearest other features by cosine of decoder directions: (ids (d, n), cos (d, n)).

    Computed in row chunks so memory is O(chunk · d), not d².
    """
    u = torch.nn.functional.normalize(directions.float(), dim=1)  # (d, d_in)
    d = u.shape[0]
    n = min(n, max(d - 1, 0))
    ids, vals = torch.zeros(d, n, dtype=torch.int64), torch.zeros(d, n)
    for a in range(0, d, chunk):
        cos = u[a : a + chunk] @ u.T  # (c, d)
        cos[torch.arange(cos.shape[0]), torch.arange(a, a + cos.shape[0])] = float("-inf")  # not itself
        v, i = torch.topk(cos, n, dim=1)
        ids[a : a + chunk], vals[a : a + chunk] = i, v
    return ids, vals


def logit_effects(directions: Tensor, W_U: Tensor, *, gamma: Tensor | None = None, n: int = 10):
    """Tokens each direction most promotes and suppresses through the unembedding.

    directions: (d_dict, d_model) in the residual stream; W_U: (d_model, d_vocab);
    gamma: (d_model,) the final LayerNorm's weight, or None when it is folded into W_U.
    The final LayerNorm centres its input and divides by a per-token norm; the division is
    a positive common factor, so it changes magnitudes but not which tokens rank highest.
    We therefore centre the direction, scale by gamma and multiply by W_U — the direct
    effect on the logits per unit of feature activation, up to that factor.
    Returns (top_ids, top_vals, bottom_ids, bottom_vals), each (d_dict, n).
    """
    dirs = directions.float()
    dirs = dirs - dirs.mean(-1, keepdim=True)
    if gamma is not None:
        dirs = dirs * gamma.float()
    logits = dirs @ W_U.float()  # (d_dict, d_vocab)
    n = min(n, max(1, logits.shape[1] // 2))  # a tiny vocabulary must not list a token on both sides
    top = torch.topk(logits, n, dim=1)
    bot = torch.topk(-logits, n, dim=1)
    return top.indices, top.values, bot.indices, -bot.values
