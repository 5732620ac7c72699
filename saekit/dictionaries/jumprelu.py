"""JumpReLU SAE: the architecture of Gemma Scope and of SAELens's `jumprelu` folders.

    pre = (x_n - a · b_dec) @ W_enc + b_enc            (n_tok, d_dict)
    f   = ReLU(pre) · [pre > threshold]                 per latent threshold θ_i ≥ 0
    x̂_n = f @ W_dec + b_dec

(Rajamanoharan et al. 2024, "Jumping Ahead", §2; SAELens `JumpReLUSAE.encode`).  `a` is
SAELens's `apply_b_dec_to_input` flag kept as a 0/1 buffer so that folders written with
it off (Gemma Scope) are reproduced by their own formula, not by an algebraically equal
rewrite that would round differently.  x_n = scale · x as for every saekit dictionary.

It loads SAELens and Gemma Scope folders (and saekit's batchtopk exported as jumprelu), and
it trains (`training_forward`): the step function has no useful gradient, so θ learns
through its pseudo-derivative, a rectangle kernel of bandwidth ε (straight-through, §3):

    ∂f_i/∂θ_i = −(θ_i/ε)·K((pre_i − θ_i)/ε),   ∂H(pre_i − θ_i)/∂θ_i = −(1/ε)·K((pre_i − θ_i)/ε)
    loss = ‖x_n − x̂_n‖²/d_in + λ·L0/d_in,   L0 = Σ_i H(pre_i − θ_i)   (mean over the batch)

With a target L0 (`cfg.k`), λ follows the error: λ ← λ·exp(η·(L0/k − 1)) each step, so
runs at equal L0 can be compared; thresholds start at the quantile of a data sample's
pre-activations that makes L0 = 8k, at most a tenth of the latents (`init_from_data`).  Decoder rows are kept at unit norm,
as for TopK, so the codes carry the features' magnitudes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saekit.dictionaries.base import DictConfig, Dictionary, Provenance, TrainOutput
from saekit.dictionaries.sae import geometric_median, tied_unit_init


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 on |u| < 1/2: the kernel of the pseudo-derivatives (Rajamanoharan et al. 2024, §3)."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """f = pre·H(pre − θ); ∂f/∂pre = H(pre − θ) (exact), ∂f/∂θ = −(θ/ε)·K((pre − θ)/ε) (pseudo)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        on = pre > theta
        ctx.save_for_backward(pre, theta, on)
        ctx.eps = eps
        return pre * on

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, theta, on = ctx.saved_tensors
        eps = ctx.eps
        g_theta = -(theta / eps) * (g * rectangle((pre - theta) / eps)).sum(0)
        return g * on, g_theta, None


class StepFn(torch.autograd.Function):
    """H(pre − θ); no gradient to pre (the true one is 0), ∂/∂θ = −(1/ε)·K((pre − θ)/ε) (pseudo)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        return None, -(g * rectangle((pre - theta) / eps)).sum(0) / eps, None


class JumpReLUSAE(Dictionary):
    """f = ReLU(pre)·[pre > θ] with pre = (x_n − a·b_dec) W_enc + b_enc;  x̂_n = f W_dec + b_dec."""

    kind = "jumprelu"

    def __init__(self, cfg: DictConfig, prov: Provenance | None = None):
        super().__init__(cfg, prov)
        d_in, d_dict = cfg.d_in, cfg.d_dict
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_dict))  # (d_in, d_dict)
        self.b_enc = nn.Parameter(torch.zeros(d_dict))
        self.register_parameter("W_dec", nn.Parameter(torch.zeros(d_dict, d_in)))  # (d_dict, d_in)
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.threshold = nn.Parameter(torch.zeros(d_dict))  # trained; a plain tensor in the saved file as before
        self.register_buffer("apply_b_dec_to_input", torch.tensor(1.0))
        self.register_buffer("l0_coef", torch.tensor(self.initial_l0_coef))

    # The base class declares W_dec as a property; this one returns the registered parameter
    # (raising AttributeError while it is absent so nn.Module can register it).
    @property
    def W_dec(self) -> Tensor:  # type: ignore[override]
        try:
            return self._parameters["W_dec"]
        except KeyError:
            raise AttributeError("W_dec") from None

    def pre_acts(self, xn: Tensor) -> Tensor:
        """Pre-activations (n_tok, d_dict) on normalised inputs."""
        return (xn - self.b_dec * self.apply_b_dec_to_input) @ self.W_enc + self.b_enc

    def encode_n(self, xn: Tensor) -> Tensor:
        pre = self.pre_acts(xn)
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def decode_n(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    # --- training ------------------------------------------------------------------------------
    bandwidth = 0.1
    """ε of the pseudo-derivatives, in normalised units (E‖x_n‖² = d_in, so per-dimension scale ~1).
    Wider than the paper's 0.001 (its inputs had E‖x‖² = 1, i.e. ~√d_in smaller coordinates)."""
    initial_l0_coef = 1.0
    """λ at the start (and for good without a target L0; `cfg.l1` overrides it when > 0)."""
    l0_rate = 0.02
    """η: how fast λ follows the target L0 (log-λ moves by η·(L0/k − 1) a step)."""
    weight_lr_scale = 3.0
    """Unit-norm decoder rows turn slowly at the run's lr (see TopKSAE.weight_lr_scale)."""
    init_l0_factor = 8.0
    """θ starts where this × k latents would fire per row on the init sample, and L0 falls towards k as in
    the paper's runs.  Starting at L0 = k, the encoder's first steps suppressed most firings faster
    than θ could follow (L0 2.9 for 5 after 245 steps); ×4: 4.9, ×8: 5.0 and MCC 0.72 → 0.79 → 0.83
    (benchmarks/README.md); ×16 drove λ to ~2,000, whose θ gradient then ate the clip budget."""
    init_fire_share = 0.1
    """…but no latent starts firing on more than this share of rows (8k of 48 latents, half of each row,
    left a planted 24-feature dictionary unfound: MCC 0.55)."""
    threshold_lr_scale = 1.0
    """θ's Adam lr is this × the run's lr: Adam moves θ by about that much a step, whatever its gradient."""

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Random unit decoder rows, encoder = their transpose, zero biases; θ set from data in `init_from_data`."""
        tied_unit_init(self, generator)
        with torch.no_grad():
            self.threshold.fill_(self.bandwidth)
            self.apply_b_dec_to_input.fill_(1.0)
            self.l0_coef.fill_(self.cfg.l1 or self.initial_l0_coef)

    @torch.no_grad()
    def init_from_data(self, xn: Tensor) -> None:
        """b_dec ← geometric median; θ_i ← the quantile of latent i's pre-activations that fires k/d_dict of the rows."""
        self.b_dec.copy_(geometric_median(xn.float()).to(self.b_dec))
        if self.cfg.k:
            pre = self.pre_acts(xn)
            q = 1 - min(self.init_fire_share, self.init_l0_factor * self.cfg.k / self.cfg.d_dict)
            row = min(pre.shape[0], max(1, round(q * pre.shape[0])))
            self.threshold.copy_(pre.kthvalue(row, dim=0).values.clamp_min(self.bandwidth))

    def param_groups(self, lr: float) -> list[dict]:
        mats = [p for p in self.parameters() if p.dim() >= 2]
        vecs = [p for p in self.parameters() if p.dim() < 2 and p is not self.threshold]
        return [{"params": mats, "lr": lr * self.weight_lr_scale}, {"params": vecs, "lr": lr},
                {"params": [self.threshold], "lr": lr * self.threshold_lr_scale}]

    def training_forward(self, xn: Tensor, **_) -> TrainOutput:
        pre = self.pre_acts(xn)  # (n, d_dict)
        f = JumpReLUFn.apply(pre, self.threshold, self.bandwidth)
        l0_rows = StepFn.apply(pre, self.threshold, self.bandwidth).sum(-1)  # (n,)
        err = f @ self.W_dec + self.b_dec - xn
        mse = err.pow(2).mean()
        l0 = l0_rows.mean()
        coef = self.l0_coef.clone()  # the update below is in place
        sparsity = coef * l0 / self.cfg.d_in
        if self.cfg.k:
            with torch.no_grad():  # λ follows the target L0; on the device, no sync
                self.l0_coef.mul_(torch.exp(self.l0_rate * (l0.detach() / self.cfg.k - 1)))
        fired = (f.detach() != 0).any(0)
        return TrainOutput(mse + sparsity, {"mse": mse, "l0_penalty": sparsity.detach(), "l0_coef": coef}, fired, l0.detach())

    def loss_terms(self, xn: Tensor, **state) -> dict[str, Tensor]:
        out = self.training_forward(xn, **state)
        return {"loss": out.loss, **out.terms}

    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the gradient component parallel to each unit decoder row (it would only change its norm)."""
        W, g = self.W_dec, self.W_dec.grad
        if g is not None:
            g.sub_((g * W).sum(-1, keepdim=True) * W)

    @torch.no_grad()
    def after_step(self) -> None:
        """Unit decoder rows again; θ ≥ 0 (a negative threshold would let ReLU's zero through as a firing)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        self.threshold.clamp_(min=0)
