"""The k = 1 code choice, fast: the most similar code per group without materialising the (G, n, C) similarities.

Codebook Features' TokFSM codebooks choose one code of 1000 per group at every layer, so the
choice is a large share of an in-model training step.  `choose_codes` (the eager reference,
any k) builds the full (G, n, C) similarity tensor with a strided batched matmul and ranks
it with a top-k; for k = 1 this does the same arithmetic in L2-sized row blocks of each
group's slices (read in place: BLAS takes the row stride) and takes an argmax.  Same result as the reference (a test checks it).

The argmax itself: `torch.argmax` over the last axis walks each row with a scalar compare
(~1.2 ns per similarity on one thread, as long as the per-head matmul that made them).  Here
`amax` (vectorised) finds each row's maximum and a numba loop the first index holding it,
stopping there: the same index as `torch.argmax` (first of equal maxima; a row's first NaN
when it has one, as torch ranks NaN above everything): 10 ms against 30 ms for 32 M similarities in cache
(one thread; an attention codebook's choice at batch 64 × 128 went from ~65 to ~45 ms, its matmul being the rest).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_BYTES = 1 << 20
"""Similarities per block (G, rows, C) float32 kept near 1 MiB, so the argmax reads them from L2."""


@numba.njit(nogil=True, cache=True)
def _first_index_of(sims, best, out, i0):
    """out[g, i0 + r] = the first c with sims[g, r, c] == best[g, r] (the first NaN when best[g, r] is NaN)."""
    G, n, C = sims.shape
    for g in range(G):
        for r in range(n):
            b = best[g, r]
            out[g, i0 + r] = 0
            if b != b:
                for c in range(C):
                    if sims[g, r, c] != sims[g, r, c]:
                        out[g, i0 + r] = c
                        break
            else:
                for c in range(C):
                    if sims[g, r, c] == b:
                        out[g, i0 + r] = c
                        break


def argmax_last(sims: Tensor) -> Tensor:
    """`sims.argmax(-1)` of a CPU float32 tensor (…, C), the same indices, from amax + a first-match scan."""
    C = sims.shape[-1]
    flat = sims.reshape(1, -1, C).contiguous()
    out = np.empty((1, flat.shape[1]), dtype=np.int64)
    _first_index_of(flat.numpy(), flat.amax(-1).numpy(), out, 0)
    return torch.from_numpy(out).view(sims.shape[:-1])


@torch.no_grad()
def choose_codes_k1(xn: Tensor, codebook: Tensor, similarity: str, block: int | None = None) -> Tensor:
    """Index of the most similar code per token and group: xn (n, G·d_g), codebook (G, C, d_g) -> (n, G, 1).

    similarity: cosine (codes normalised; the input's norm does not change the argmax) or inner.
    block: rows per block (default: BLOCK_BYTES of similarities).
    """
    G, C, d_g = codebook.shape
    n = xn.shape[0]
    block = min(n, block or max(16, BLOCK_BYTES // (4 * G * C)))
    codes = F.normalize(codebook, dim=-1) if similarity == "cosine" else codebook
    xg = xn.reshape(n, G, d_g).transpose(0, 1)  # (G, n, d_g), strided: BLAS reads each block in place (a copy cost ~5 ms per attention codebook at batch 64)
    ct = codes.transpose(1, 2).contiguous().to(xg.dtype)  # (G, d_g, C)
    if xg.dtype != torch.float32 or xg.device.type != "cpu":
        xg = xg.contiguous()
        out = torch.cat([torch.bmm(xg[:, i:i + block], ct).argmax(-1) for i in range(0, n, block)], 1)  # (G, n)
        return out.t().unsqueeze(-1)
    out = np.empty((G, n), dtype=np.int64)
    sims, best = torch.empty(G, block, C), torch.empty(G, block)  # reused: no allocation per block
    for i in range(0, n, block):
        b = min(block, n - i)
        s, m = (sims, best) if b == block else (sims[:, :b].contiguous(), best[:, :b].contiguous())
        torch.bmm(xg[:, i:i + b], ct, out=s)  # (G, b, C)
        torch.amax(s, -1, out=m)  # (G, b)
        _first_index_of(s.numpy(), m.numpy(), out, i)
    return torch.from_numpy(out).t().unsqueeze(-1)
