"""The k = 1 code choice, fast: the most similar code per group without materialising the (G, n, C) similarities.

Codebook Features' TokFSM codebooks choose one code of 1000 per group at every layer, so the
choice is a large share of an in-model training step.  `choose_codes` (the eager reference,
any k) builds the full (G, n, C) similarity tensor with a strided batched matmul and ranks
it with a top-k; for k = 1 this does the same arithmetic in cache-sized row blocks on
contiguous per-group slices and takes an argmax, 1.2-3× less CPU time on the paper's
shapes (benchmarks/codebook_speed.py).  Same result as the reference (a test checks it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_ROWS = 256
"""Rows per block: (G, 256, 1000) float32 similarities stay in cache."""


@torch.no_grad()
def choose_codes_k1(xn: Tensor, codebook: Tensor, similarity: str, block: int = BLOCK_ROWS) -> Tensor:
    """Index of the most similar code per token and group: xn (n, G·d_g), codebook (G, C, d_g) -> (n, G, 1).

    similarity: cosine (codes normalised; the input's norm does not change the argmax) or inner.
    """
    G, C, d_g = codebook.shape
    n = xn.shape[0]
    codes = F.normalize(codebook, dim=-1) if similarity == "cosine" else codebook
    xg = xn.reshape(n, G, d_g).transpose(0, 1).contiguous()  # (G, n, d_g)
    ct = codes.transpose(1, 2).contiguous().to(xg.dtype)  # (G, d_g, C)
    out = torch.empty(G, n, dtype=torch.long, device=xn.device)
    for i in range(0, n, block):
        out[:, i:i + block] = torch.bmm(xg[:, i:i + block], ct).argmax(-1)  # (G, b, C) -> (G, b)
    return out.t().unsqueeze(-1)
