"""JumpReLU SAE: the architecture of Gemma Scope and of SAELens's `jumprelu` folders.

    pre = (x_n - a · b_dec) @ W_enc + b_enc            (n_tok, d_dict)
    f   = ReLU(pre) · [pre > threshold]                 per latent threshold θ_i ≥ 0
    x̂_n = f @ W_dec + b_dec

(Rajamanoharan et al. 2024, "Jumping Ahead", §2; SAELens `JumpReLUSAE.encode`).  `a` is
SAELens's `apply_b_dec_to_input` flag kept as a 0/1 buffer so that folders written with
it off (Gemma Scope) are reproduced by their own formula, not by an algebraically equal
rewrite that would round differently.  x_n = scale · x as for every saekit dictionary.

saekit has no JumpReLU trainer: this kind exists so SAELens and Gemma Scope dictionaries
(and saekit's batchtopk exported as jumprelu) load, splice and analyse like any other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saekit.dictionaries.base import DictConfig, Dictionary, Provenance
from saekit.errors import SaekitError


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
        self.register_buffer("threshold", torch.zeros(d_dict))
        self.register_buffer("apply_b_dec_to_input", torch.tensor(1.0))

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

    def loss_terms(self, xn: Tensor, **state) -> dict[str, Tensor]:
        raise SaekitError(
            "jumprelu dictionaries are loaded (from SAELens / Gemma Scope) for splicing and analysis; "
            "saekit cannot train them: train kind relu, topk or batchtopk instead"
        )
