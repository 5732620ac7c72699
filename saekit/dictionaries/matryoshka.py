"""Matryoshka SAE: BatchTopK whose nested prefixes of latents must each reconstruct the input alone.

    f     = BatchTopK_{k·n}(ReLU(pre))                          (as `batchtopk`; θ at inference)
    x̂_m   = f[:, :m] W_dec[:m] + b_dec      for each prefix size m in `prefixes(d_dict)`
    loss  = mean_m ‖x_n − x̂_m‖² / d_in + α · AuxK

The first latents have to explain the input with no help from the later ones, so they learn
the general features (a parent), and later latents add detail (its children) instead of
absorbing the parent into each child (Nabeshima 2024; Bussmann et al. 2025, "Learning
Multi-Level Features with Matryoshka Sparse Autoencoders", §3).  Inference, files and
export are BatchTopK's: only the training objective differs.
"""

from __future__ import annotations

from torch import Tensor

from saekit.dictionaries.base import TrainOutput
from saekit.dictionaries.fast import batch_topk_mask
from saekit.dictionaries.sae import BatchTopKSAE


def prefixes(d_dict: int, levels: int = 5) -> list[int]:
    """Nested prefix sizes, doubling up to d_dict: d_dict/16, /8, /4, /2, d_dict (fewer when d_dict is small)."""
    sizes = sorted({max(1, d_dict >> i) for i in range(levels)})
    return sizes


class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK trained with the mean reconstruction loss of nested prefixes (module docstring)."""

    kind = "matryoshka"
    levels = 5
    """Prefixes per dictionary: d_dict / 2^(levels-1), ..., d_dict / 2, d_dict."""

    def training_forward(self, xn: Tensor, dead: Tensor | None = None, aux_k: int | None = None, aux_coef: float = 1 / 32, **_) -> TrainOutput:
        pre = self.pre_acts(xn)  # (n, d_dict)
        f = batch_topk_mask(pre, self.cfg.k)  # (n, d_dict), k per row on average
        self._update_threshold(f.detach())
        x_hat = self.b_dec.expand_as(xn)
        start, terms = 0, []
        for m in prefixes(self.cfg.d_dict, self.levels):  # x̂ grows by one slice of latents at a time
            x_hat = x_hat + f[:, start:m] @ self.W_dec[start:m]
            terms.append((x_hat - xn).pow(2).mean())
            start = m
        mse = sum(terms) / len(terms)
        full = terms[-1]
        aux = self.aux_loss(pre, (x_hat - xn).detach(), dead, aux_k)
        active = f > 0
        return TrainOutput(mse + aux_coef * aux, {"mse": full, "prefix_mse": terms[0], "auxk": aux}, active.any(0),
                           active.sum(-1).float().mean())
