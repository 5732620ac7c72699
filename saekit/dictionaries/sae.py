"""Sparse autoencoders: ReLU + L1 (`relu`), TopK (`topk`) and BatchTopK (`batchtopk`).

All three share one parametrisation (names match SAELens / sparsify so interop is a
rename-free copy), in normalised space x_n = scale · x:

    W_enc (d_in, d_dict)   b_enc (d_dict,)   W_dec (d_dict, d_in)   b_dec (d_in,)
    pre  = (x_n − b_dec) W_enc + b_enc                                  # (n_tok, d_dict)
    x̂_n  = f W_dec + b_dec

and differ in how the codes f are picked from `pre` and in the training loss.

Training goes through `training_forward(xn, **state) -> TrainOutput` (loss, named terms,
per-latent fire counts, L0 — all tensors, so the trainer never syncs with the device
except when it logs); `loss_terms` is the same thing as a dict.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saekit.dictionaries.base import DictConfig, Dictionary, Provenance, TrainOutput
from saekit.dictionaries import fast
from saekit.dictionaries.fast import (TopKEncode, _dead_codes, _kernels_for, aux_term, dead_cols,
                                      batch_topk_above, batch_topk_candidates, batch_topk_mask, recon_error, relu_loss,
                                      row_topk, sparse_decode, topk_codes)


# --- pure maths ---------------------------------------------------------------------------------

@torch.no_grad()
def tied_unit_init(d: nn.Module, generator: torch.Generator) -> None:
    """Random unit decoder rows, the encoder their transpose, zero biases: every SAE kind's starting point."""
    W = torch.randn(d.cfg.d_dict, d.cfg.d_in, generator=generator)
    W /= W.norm(dim=-1, keepdim=True)
    d.W_dec.copy_(W)
    d.W_enc.copy_(W.t())
    d.b_enc.zero_()
    d.b_dec.zero_()


def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising Σ‖x_i − m‖ (robust to outlier rows, unlike the mean).

    Distances come from ‖x_i‖² − 2 x_i·m + ‖m‖², so an iteration is two matrix-vector products
    over x and no (n, d) temporaries: 4-6× faster than forming x − m (16,384 × 128 rows: ~25
    against ~120 ms on one CPU thread).  It runs at the start of every SAE's training.
    """
    mean = x.mean(0)
    x = x - mean  # centred once, so the expansion below does not cancel a large common offset
    m = torch.zeros_like(mean)
    sq = (x * x).sum(-1)  # (n,)
    for _ in range(iters):
        w = torch.addmv(sq, x, m, alpha=-2).add_(m.dot(m)).clamp_min_(eps * eps).rsqrt_()  # 1 / ‖x_i − m‖
        new = (w @ x) / w.sum()
        if (new - m).norm() < eps * (1 + (mean + m).norm()):
            return mean + new
        m = new
    return mean + m



class _SAE(Dictionary):
    """Shared parameters, init, encoder pre-activations and decoder of every SAE kind."""

    unit_norm_decoder = False

    def __init__(self, cfg: DictConfig, prov: Provenance | None = None):
        super().__init__(cfg, prov)
        d_in, d_dict = cfg.d_in, cfg.d_dict
        # Random unit decoder rows; encoder = decoder transpose so every latent starts out
        # reading the direction it writes (Gao et al. 2024 §A.1; Anthropic, April 2024 update).
        g = torch.Generator().manual_seed(0)
        W_dec = torch.randn(d_dict, d_in, generator=g)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.t().clone().contiguous())  # (d_in, d_dict)
        self.b_enc = nn.Parameter(torch.zeros(d_dict))
        # The base class declares W_dec as a property; store the parameter under that name directly.
        self._parameters["W_dec"] = nn.Parameter(W_dec)  # (d_dict, d_in)
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self._ws: dict = {}  # reusable work tensors of the fused training steps (not state: never saved)

    @property
    def W_dec(self) -> Tensor:
        return self._parameters["W_dec"]

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Fresh random init (the trainer seeds it, so each run is reproducible)."""
        tied_unit_init(self, generator)

    def init_from_data(self, xn: Tensor) -> None:
        """b_dec ← geometric median of a sample, so the encoder sees centred inputs from step 0."""
        with torch.no_grad():
            self.b_dec.copy_(geometric_median(xn.float()).to(self.b_dec))

    def pre_acts(self, xn: Tensor) -> Tensor:
        """(x_n − b_dec) W_enc + b_enc, written as x_n W_enc + (b_enc − b_dec W_enc).

        Same value; but autograd then gets b_dec's gradient from a vector-matrix product
        instead of an (n, d_dict)·(d_dict, d_in) product for the gradient of (x_n − b_dec).
        """
        return torch.addmm(torch.addmv(self.b_enc, self.W_enc.t(), self.b_dec, alpha=-1), xn, self.W_enc)  # (n, d_dict)

    def decode_n(self, f: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, f, self.W_dec)  # (n, d_in)

    def loss_terms(self, xn: Tensor, **state) -> dict[str, Tensor]:
        out = self.training_forward(xn, **state)
        return {"loss": out.loss, **out.terms}

    # --- decoder constraint (topk, batchtopk) ---------------------------------------------
    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the gradient component parallel to each unit decoder row (it would only change its norm)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            W, g = self.W_dec, self.W_dec.grad
            g.sub_((g * W).sum(-1, keepdim=True) * W)

    @torch.no_grad()
    def after_step(self) -> None:
        """Project decoder rows back to unit norm (Adam's step is not exactly tangent)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))


class ReluSAE(_SAE):
    """ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Towards Monosemanticity" + April 2024 update).

        f    = ReLU((x_n − b_dec) W_enc + b_enc)
        x̂_n  = f W_dec + b_dec
        loss = ‖x_n − x̂_n‖² / d_in + (λ / d_in) Σ_i f_i ‖W_dec,i‖          (mean over tokens)

    With E‖x_n‖² = d_in this is the update's loss divided by d_in (the same λ scale as
    SAELens's); the trainer warms λ up linearly from 0.  Weighting by ‖W_dec,i‖ stops
    the model from shrinking f by growing decoder rows, so no norm constraint is needed.

    Init: unit decoder rows and W_enc = W_decᵀ (the shared `_SAE` init), not the update's
    rows of norm 0.1.  The loss does not change when a latent is rescaled (row i of W_dec
    × c, column i of W_enc and b_enc ÷ c), but Adam's steps do: it moves each weight by
    about lr per step whatever its size, so a latent's threshold in the output's units,
    −b_enc,i ‖W_dec,i‖, can grow only ‖W_dec,i‖ × lr per step.  From rows of norm 0.1
    (still ≈ 0.25 after 98 steps at lr 1.1e-3), λ bought shrinkage rather than zeros.
    On the toy store, unit rows gave a lower L0 at every λ. At equal L0 the FVU was 4-7×
    lower at 98 steps and 2-3× lower at 489, ahead of dictionary_learning's unit-norm
    trainer (benchmarks/README.md, "ReLU/L1 at low L0").

    With W_enc = W_decᵀ every latent whose direction has a positive projection fires, so
    the first reconstruction is about (d_dict / 2 d_in) x: 16× too large at d_dict 4096,
    d_in 128, and a 98-step run never recovered (FVU 0.92).  `init_from_data` therefore
    scales W_enc by the least-squares factor of the first reconstruction on the data
    sample (exact, since ReLU(c z) = c ReLU(z) for c > 0 while b_enc = 0).
    """

    kind = "relu"

    def init_from_data(self, xn: Tensor) -> None:
        """b_dec ← geometric median; then W_enc × c, the c minimising ‖c x̂ − (x_n − b_dec)‖² on the sample."""
        super().init_from_data(xn)
        with torch.no_grad():
            xc = xn.float().to(self.W_enc) - self.b_dec
            x_hat = (xc @ self.W_enc).relu_() @ self.W_dec
            c = (x_hat * xc).sum() / x_hat.pow(2).sum().clamp_min(1e-12)
            if c > 0:
                self.W_enc.mul_(c)

    def encode_n(self, xn: Tensor) -> Tensor:
        return self.pre_acts(xn).relu()

    def training_forward(self, xn: Tensor, l1_coef: float | None = None, **_) -> TrainOutput:
        lam = float(self.cfg.l1 if l1_coef is None else l1_coef)
        # Under autocast (saekit.precision) plain autograd: ReluLoss's hand-written backward assumes one dtype.
        fn = fast.relu_loss_eager if torch.is_autocast_enabled(xn.device.type) else relu_loss
        loss, mse, l1, col, l0 = fn(xn, self.W_enc, self.b_enc, self.W_dec, self.b_dec, lam, self._ws)
        return TrainOutput(loss, {"mse": mse, "l1": l1}, col > 0, l0)  # f ≥ 0: a latent fired iff Σ_n f > 0


class TopKSAE(_SAE):
    """TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

        pre  = (x_n − b_dec) W_enc + b_enc
        f    = TopK_k(ReLU(pre))            (the k largest per token, others 0)
        x̂_n  = f W_dec + b_dec,  ‖W_dec,i‖ = 1
        loss = ‖x_n − x̂_n‖² / d_in + α · AuxK

    AuxK (§A.2): the k_aux largest pre-activations among latents dead for a window of
    tokens reconstruct the residual e = x_n − x̂_n (detached); AuxK = ‖e − ê‖² / ‖e − ē‖².
    It gives dead latents a gradient towards what the live ones miss.  During training the
    decoder is applied sparsely (k rows per token; `sparse_decode`).
    """

    kind = "topk"
    unit_norm_decoder = True
    weight_lr_scale = 3.0
    """W_enc and W_dec learn at 3× the run's lr (biases at the lr itself).  Adam moves each weight
    by about lr per step whatever its size, so a unit decoder row (weights ~1/√d_in) turns by
    at most ~lr·√d_in radians a step; SAELens's rows start at norm 0.1 and so turn 10× faster
    at the same lr.  On the toy store (d_in 128, 98 and 489 steps at d_dict 512 and 4096) ×3
    lowered the held-out FVU at every point: 0.064 → 0.013 at d_dict 4096 after 98 steps
    (SAELens 0.031), 0.0029 → 0.0017 after 489; 0.0236 → 0.0101 and 0.0045 → 0.0035 at d_dict
    512 (benchmarks/README.md, "TopK at d_dict 4096")."""

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        return topk_codes(pre, self.cfg.k)

    def encode_n(self, xn: Tensor) -> Tensor:
        values, indices = self.select(self.pre_acts(xn))
        return torch.zeros(xn.shape[0], self.cfg.d_dict, dtype=values.dtype, device=values.device).scatter(1, indices, values)

    def _k_aux(self, aux_k: int | None) -> int:
        return min(aux_k or self.cfg.d_in // 2, self.cfg.d_dict)

    def aux_loss(self, pre: Tensor, err: Tensor, dead: Tensor | None, aux_k: int | None) -> Tensor:
        """AuxK term for the main codes' error err = x̂_n − x_n (detached); exactly 0 (with no host sync) when no latent is dead."""
        if dead is None:
            return err.new_zeros(())
        k_aux = self._k_aux(aux_k)
        if dead.device.type == "cpu":
            # Only the dead columns: a top-k over a row that is mostly −inf keeps every entry in the
            # numba kernel's filter (its bound is −inf), so masking cost a full sort per row.  Same
            # result: with fewer dead latents than k_aux, the masked top-k's extra picks were −inf → 0.
            cols = dead_cols(dead)
            return err.new_zeros(()) if cols is None else self._aux_term(*_dead_codes(pre, cols, k_aux), err)
        bias = torch.where(dead, 0.0, -torch.inf)  # (d_dict,): one broadcast add, no (n, d_dict) mask tensor
        values, indices = row_topk(pre + bias, k_aux)
        return self._aux_term(values.relu(), indices, err) * dead.any()

    def _aux_term(self, values: Tensor, indices: Tensor, err: Tensor) -> Tensor:
        return aux_term(values, indices, self.W_dec, err)

    def training_forward(self, xn, dead: Tensor | None = None, aux_k: int | None = None, aux_coef: float = 1 / 32, **_) -> TrainOutput:
        if fast._TOPK_STEP == "fused" and _kernels_for(xn) is not None:  # CPU: the fused encoder, AuxK's codes included
            cols = dead_cols(dead)
            values, indices, aux_values, aux_indices = TopKEncode.apply(
                xn, self.W_enc, self.b_enc, self.b_dec, self.cfg.k, self._ws, cols, self._k_aux(aux_k))
            mse, err = recon_error(sparse_decode(values, indices, self.W_dec) + self.b_dec, xn)
            aux = xn.new_zeros(()) if cols is None else self._aux_term(aux_values, aux_indices, err)
        else:
            pre = self.pre_acts(xn)  # (n, d_dict)
            values, indices = self.select(pre)  # (n, k)
            mse, err = recon_error(sparse_decode(values, indices, self.W_dec) + self.b_dec, xn)
            aux = self.aux_loss(pre, err, dead, aux_k)
        active = (values > 0).float()
        # index_add instead of boolean indexing: boolean masks force a host sync.
        fired = xn.new_zeros(self.cfg.d_dict).index_add_(0, indices.flatten(), active.flatten()) > 0
        l0 = active.sum(-1).mean()
        return TrainOutput(mse + aux_coef * aux, {"mse": mse, "auxk": aux}, fired, l0)


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

        training:  f = BatchTopK_{k·n}(ReLU(pre))   — the k·n largest over the whole batch of n tokens
        inference: f = ReLU(pre) · [pre > θ]         — θ the running mean of the smallest kept activation
        x̂_n = f W_dec + b_dec,  ‖W_dec,i‖ = 1,  loss as TopK (MSE + α · AuxK)

    Tokens get a variable number of latents (k on average); θ (buffer `threshold`) makes
    encoding independent of the batch at inference.  θ < 0 means "not estimated yet".
    """

    kind = "batchtopk"
    threshold_momentum = 0.9
    """θ's running mean forgets at this rate per step (a memory of ~10 steps).  The smallest kept
    activation is the batch's (k·n)-th largest, an order statistic that varies little between
    batches of thousands of tokens but drifts as training rescales the codes: it fell from 1.6
    to 0.42 over a 98-step run on the toy store, and at momentum 0.99 θ still held 0.95 at the
    end, so inference kept 8.4 latents per token for k 16 (benchmarks/README.md)."""
    candidates = 4
    """Where the threshold search (`batch_topk_above`, CPU) does not apply, training looks for the batch
    top-k among each token's `candidates`·k largest pre-activations (exact, `batch_topk_candidates`).
    A token that deserves more than 4k latents makes that search inexact: the fused CPU step then
    doubles the candidates, the others take the full search for that step."""

    def __init__(self, cfg: DictConfig, prov: Provenance | None = None):
        super().__init__(cfg, prov)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def encode_n(self, xn: Tensor) -> Tensor:
        pre = self.pre_acts(xn)
        return torch.where(pre > self.threshold.clamp_min(0), pre, torch.zeros_like(pre))

    @torch.no_grad()
    def _update_threshold(self, f: Tensor) -> None:
        positive = f > 0
        self._set_threshold(torch.where(positive, f, torch.full_like(f, torch.inf)).min(), positive.any())

    @torch.no_grad()
    def _set_threshold(self, smallest: Tensor, any_positive: Tensor) -> None:
        """θ ← running mean of the smallest kept activation (unchanged by a batch that kept nothing)."""
        smallest = torch.where(any_positive, smallest, self.threshold.clamp_min(0))
        m = self.threshold_momentum
        self.threshold.copy_(torch.where(self.threshold < 0, smallest, m * self.threshold + (1 - m) * smallest))

    def training_forward(self, xn, dead: Tensor | None = None, aux_k: int | None = None, aux_coef: float = 1 / 32, **_) -> TrainOutput:
        if fast._BATCHTOPK == "candidates" and self.candidates * self.cfg.k < self.cfg.d_dict:
            k, m = self.cfg.k, self.candidates * self.cfg.k
            if fast._TOPK_STEP == "fused" and _kernels_for(xn) is not None:  # CPU: the fused encoder, AuxK's codes included
                def select(pre):
                    found = batch_topk_above(pre, k)
                    if found is not None:
                        return found
                    # A NaN: the per-row candidates (torch ranks NaN first).  A token that deserves more
                    # than m latents makes that search inexact: search again with twice the candidates.
                    mm = m
                    while True:
                        values, indices, exact = batch_topk_candidates(pre, k, mm)
                        if exact:  # a host sync per search: free on CPU
                            return values, indices
                        mm = min(2 * mm, self.cfg.d_dict)

                cols = dead_cols(dead)
                values, indices, aux_values, aux_indices = TopKEncode.apply(
                    xn, self.W_enc, self.b_enc, self.b_dec, select, self._ws, cols, self._k_aux(aux_k))
                return self._sparse_forward(xn, values, indices, aux_coef, lambda err: (
                    xn.new_zeros(()) if cols is None else self._aux_term(aux_values, aux_indices, err)))
            else:
                pre = self.pre_acts(xn)
                values, indices, exact = batch_topk_candidates(pre, k, m)
                if exact:
                    return self._sparse_forward(xn, values, indices, aux_coef, lambda err: self.aux_loss(pre, err, dead, aux_k))
        return self._dense_forward(xn, self.pre_acts(xn), dead, aux_k, aux_coef)

    def _sparse_forward(self, xn, values, indices, aux_coef, aux_of) -> TrainOutput:
        """The step on (n, m) candidate codes: TopK's sparse decoder and counters, no (n, d_dict) code tensor.

        `aux_of(err)` gives the AuxK term for the reconstruction error err = x̂_n − x_n.
        """
        active = values > 0
        smallest = torch.where(active, values.detach(), torch.full_like(values, torch.inf)).min()
        self._set_threshold(smallest, active.any())
        mse, err = recon_error(sparse_decode(values, indices, self.W_dec) + self.b_dec, xn)
        aux = aux_of(err)
        fired = xn.new_zeros(self.cfg.d_dict).index_add_(0, indices.flatten(), active.flatten().to(xn.dtype)) > 0
        return TrainOutput(mse + aux_coef * aux, {"mse": mse, "auxk": aux}, fired, active.sum(-1).float().mean())

    def _dense_forward(self, xn, pre, dead, aux_k, aux_coef) -> TrainOutput:
        """The reference step: exact batch top-k over all of `pre`, dense codes and decoder."""
        f = batch_topk_mask(pre, self.cfg.k)  # (n, d_dict), k per token on average
        self._update_threshold(f.detach())
        mse, err = recon_error(self.decode_n(f), xn)
        aux = self.aux_loss(pre, err, dead, aux_k)
        active = f > 0
        return TrainOutput(mse + aux_coef * aux, {"mse": mse, "auxk": aux}, active.any(0), active.sum(-1).float().mean())
