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
