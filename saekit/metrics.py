"""Every metric saekit reports, defined once (DESIGN.md: Metrics).

Pure functions on tensors; the trainer, splice-eval, benchmarks and notebooks all
import from here so a number means the same thing everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l0(codes: Tensor) -> float:
    """Mean number of non-zero codes per row. codes: (n_tok, d_dict)."""
    return (codes != 0).float().sum(-1).mean().item()


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over rows."""
    x, x_hat = x.double(), x_hat.double()
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return (resid / total.clamp_min(1e-30)).item()


def fvu_of_error(err_sq_sum: Tensor, x: Tensor) -> Tensor:
    """`fvu` as a 0-d tensor (no sync) when Σ‖x − x̂‖² is already known (a training term): Σ‖x − mean‖² = ‖x‖² − ‖Σx‖²/n, from one
    float32 pass for each sum (~30× cheaper than the float64 reference, agreeing to ~1e-5), for logging every step."""
    n = x.shape[0]
    total = torch.linalg.vector_norm(x).double() ** 2 - x.sum(0).double().pow(2).sum() / max(n, 1)
    return err_sq_sum.double() / total.clamp_min(1e-30)


class FVUAccumulator:
    """FVU over a stream of batches, exact (sums kept in float64, mean removed at the end)."""

    def __init__(self):
        self.n = 0
        self.resid = 0.0
        self.sum = None
        self.sumsq = 0.0

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x64 = x.double()
        self.resid += (x64 - x_hat.double()).pow(2).sum().item()
        s = x64.sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq += x64.pow(2).sum().item()
        self.n += x.shape[0]

    def value(self) -> float:
        if self.n == 0:
            return float("nan")
        total = self.sumsq - self.sum.pow(2).sum().item() / self.n
        return self.resid / max(total, 1e-30)


# "Dead" has one meaning everywhere: a latent that did not fire in a stated window of tokens.
# Every number saekit prints or writes says its window: `dead_note` in text, `dead_window_tokens`
# beside `dead_fraction` / `dead_frac` in JSON.  Training's window is the last `dead_tokens`
# training tokens (a running counter, `dead_mask`); evaluation's is the tokens it read.

def dead_fraction(fire_counts: Tensor) -> float:
    """Share of latents dead over a window: fire_counts (d_dict,) counts their fires over the window's tokens."""
    return (fire_counts == 0).float().mean().item()


DEAD_WINDOW = (50_000, 0.1, 1_000_000)
"""Training's default dead window: a tenth of the run's tokens, at least 50k, at most 1M."""


def dead_window_tokens(setting: int, run_tokens: int) -> int:
    """Training's dead window: `setting` tokens, or for 0 a tenth of the run, within [50k, 1M].

    A fixed 1M-token window never fills in a run of 1M tokens or fewer, so AuxK never acts
    there; a tenth of the run lets it revive latents early (ground-truth benchmark,
    benchmarks/README.md "Dead window": BatchTopK MCC 0.848 → 0.899 at 500k tokens).  The 50k
    floor keeps rare latents (firing once in 20k tokens) from counting as dead in short runs;
    the 1M cap is the old default, so runs of 10M tokens or more are unchanged.  The window
    follows the run's length: a run extended on resume uses the longer run's window from there.
    """
    low, share, high = DEAD_WINDOW
    return setting or min(high, max(low, round(share * run_tokens)))


def dead_mask(since_fired: Tensor, window: int) -> Tensor:
    """(d_dict,) bool: latents that have not fired in the last `window` tokens; since_fired (d_dict,) counts tokens since each last fired."""
    return since_fired > window


def dead_note(fraction: float | None, window_tokens: int, where: str, *, last: bool = False) -> str:
    """The one way a dead fraction is printed: `dead 23.4% (not fired in 3,810 eval tokens)`;
    `last=True` for a running window (`... in the last 1,000,000 training tokens`); None while a
    running window is longer than what was seen (no latent can be dead yet: `dead – (...)`)."""
    shown = "–" if fraction is None else f"{fraction:.1%}"
    return f"dead {shown} ({dead_window(window_tokens, where, last=last)}{'; fewer seen so far' if fraction is None else ''})"


def dead_window(window_tokens: int, where: str, *, last: bool = False) -> str:
    """`not fired in 3,810 eval tokens`: the window words of `dead_note`, for table headers."""
    return f"not fired in {'the last ' if last else ''}{int(window_tokens):,} {where} tokens"


def ce_per_token(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy at every position that has a next token: (B, T-1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None].long()).squeeze(-1)


def kl_per_token(clean_logits: Tensor, other_logits: Tensor) -> Tensor:
    """KL(clean ‖ other) of the next-token distributions at each position: (B, T)."""
    p = F.log_softmax(clean_logits.float(), dim=-1)
    q = F.log_softmax(other_logits.float(), dim=-1)
    return (p.exp() * (p - q)).sum(-1)


def correct_per_token(logits: Tensor, tokens: Tensor) -> Tensor:
    """1.0 where the argmax prediction equals the next token: (B, T-1)."""
    return (logits[:, :-1].argmax(-1) == tokens[:, 1:]).float()


def loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """(CE_ablated − CE_spliced) / (CE_ablated − CE_clean): 1 = nothing lost, 0 = as bad as ablation."""
    denom = ce_ablated - ce_clean
    if abs(denom) < 1e-12:
        return float("nan")
    return (ce_ablated - ce_spliced) / denom


def js_per_token(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Jensen–Shannon divergence (natural log, in [0, ln 2]) between two next-token distributions: (...,)."""
    lp = F.log_softmax(p_logits.float(), dim=-1)
    lq = F.log_softmax(q_logits.float(), dim=-1)
    lm = torch.logsumexp(torch.stack([lp, lq]), dim=0) - torch.log(torch.tensor(2.0))
    return 0.5 * ((lp.exp() * (lp - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))


# --------------------------------------------------------------------------- ground truth (DESIGN.md: Ground truth)
# A dictionary is judged by whether its latents are the true features: decoder rows against
# true directions (MCC), and firing against true firing (precision / recall / F1 per feature).


def match_directions(dec: Tensor, true: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Optimal one-to-one matching of latents to true features by |cosine| (Hungarian).

    dec: (d_dict, d), true: (N, d).  Returns (latent ids, feature ids, |cos| of each pair),
    min(d_dict, N) pairs maximising the summed |cosine|.
    """
    from scipy.optimize import linear_sum_assignment

    cos = (F.normalize(dec.double(), dim=1) @ F.normalize(true.double(), dim=1).T).abs()
    rows, cols = linear_sum_assignment(cos.cpu().numpy(), maximize=True)
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    return rows, cols, cos[rows, cols].float().cpu()


def mcc(dec: Tensor, true: Tensor) -> float:
    """Mean |cosine| between decoder rows and true directions under the optimal one-to-one matching.

    Averaged over the N true features (a feature left unmatched because d_dict < N scores 0),
    so 1 means every true direction has its own latent.
    """
    _, _, c = match_directions(dec, true)
    return c.sum().item() / true.shape[0]


def firing_f1(tp: Tensor, fired: Tensor, true_count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Precision, recall, F1 of every latent l as a detector of every feature j: (d_dict, N) each.

    tp[l, j]: rows where both fire; fired[l]: rows where latent l fires; true_count[j]: rows
    where feature j fires.  0/0 counts as 0.
    """
    tp = tp.double()
    fired, true_count = fired.double()[:, None], true_count.double()[None, :]
    precision = tp / fired.clamp_min(1)
    recall = tp / true_count.clamp_min(1)
    f1 = 2 * tp / (fired + true_count).clamp_min(1)
    return precision, recall, f1


def best_latents(f1: Tensor) -> Tensor:
    """(N,) the latent with the highest F1 for each true feature (lowest id on ties)."""
    return f1.argmax(0)


def uniqueness(best: Tensor) -> float:
    """Share of true features whose best latent is no other feature's best (1: no latent serves two features)."""
    counts = torch.bincount(best)
    return (counts[best] == 1).float().mean().item()


def absorption(parent_fires: Tensor, parent_latent_fires: Tensor, child_latents_fire: Tensor) -> float:
    """Share of a parent's firings its own latent misses while one of its children's latents fires.

    Booleans over the rows of one parent feature: its true firing, its best latent's firing,
    and whether any of its children's best latents fires.  0 = no absorption.
    """
    n = parent_fires.sum().item()
    if n == 0:
        return float("nan")
    return (parent_fires & ~parent_latent_fires & child_latents_fire).sum().item() / n
