"""Token arrays: padding, which positions count, what the model is fed.  A leaf: imports torch only.

Every stage agrees on these rules, so a dictionary is harvested, trained (offline, e2e,
in the model) and evaluated on the same positions:
- `PAD` (-1) marks padding in every token array (stores, splice-eval, in-model data);
- a position counts when it is not padding, and not position 0 when BOS is excluded
  (`row_mask`: the store's training rows, the positions splice-eval replaces);
- the model never sees `PAD`: it is swapped for BOS after the text, where causal
  attention keeps it out of every real position (`model_input`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

PAD = -1
"""Padding token id in every saekit token array."""


def row_mask(tokens, skip_bos: bool = True):
    """(B, T) bool: the positions that count (not padding; not position 0 when skip_bos).

    numpy in, numpy out (the store's rows); torch in, torch out (splice, e2e, finetune).
    """
    mask = tokens != PAD
    if skip_bos:
        mask[:, 0] = False
    return mask


def scored_mask(tokens: Tensor) -> Tensor:
    """(B, T-1) bool: positions that have a real next token (both it and the next one are not padding)."""
    return (tokens[:, :-1] != PAD) & (tokens[:, 1:] != PAD)


def model_input(tokens: Tensor, bos_id: int) -> Tensor:
    """Padding replaced by BOS for the forward (torch or numpy)."""
    if isinstance(tokens, np.ndarray):
        return np.where(tokens == PAD, bos_id, tokens)
    return torch.where(tokens == PAD, torch.full_like(tokens, bos_id), tokens)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values (B, T) over the positions where mask is True (0 when there are none)."""
    return (values * mask).sum() / mask.sum().clamp_min(1)
