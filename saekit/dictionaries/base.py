"""The interface every dictionary kind shares, and its file format.

A dictionary maps activations x (the hook's original scale, shape (n_tok, d_in)) to
codes f (n_tok, d_dict) and back:  x̂ = decode(encode(x)).  Internally each kind works on
normalised inputs  x_n = scale · x  (scale from the store's statistics, so that
E‖x_n‖² = d_in and hyperparameters transfer across models); `encode`/`decode` apply and
undo the scale, so users never see it.

On disk (format `saekit-dictionary`, version 1): `config.json` (kind, architecture,
provenance, normalisation, training summary) + `weights.safetensors`.  Loading never
unpickles.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from saekit.config import check_fields
from saekit.errors import SaekitError
from saekit.runs import atomic, write_json

FORMAT = "saekit-dictionary"
VERSION = 1
SAE_KINDS = ("relu", "topk", "batchtopk", "codebook", "jumprelu", "matryoshka")
CODER_KINDS = ("transcoder", "skip-transcoder", "crosscoder", "clt")
"""Kinds that read input hooks and predict target hooks (saekit.dictionaries.coders)."""
KINDS = SAE_KINDS + CODER_KINDS
ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
"""How the coder kinds pick their codes (the SAE kinds of the same names)."""
LOADED_KINDS: tuple[str, ...] = ()  # kinds read from other formats but not trained (none since jumprelu trains)


@dataclass
class DictConfig:
    """Architecture of one dictionary (saved in config.json as `arch`, nested in the run configs as `arch`;
    a run sets `d_in` from the store and, in a sweep, `k` or `l1` per dictionary)."""

    kind: str = "topk"
    """Dictionary kind: relu | topk | batchtopk | codebook | jumprelu (k = target L0) | matryoshka (BatchTopK, nested prefixes);
    transcoder | skip-transcoder (--hook MLP inputs, --target MLP outputs, one per pair) | crosscoder (one over all --hook) |
    clt (--hook MLP inputs, --target MLP outputs, every layer; --hook all finds them)."""
    d_in: int = field(default=0, metadata={"flag": False})
    """Width of the hook's activation vector (heads flattened); coder kinds: of all input hooks concatenated."""
    d_dict: int = 0
    """Number of latents (codebook: codes over all groups); 0 in a run config: expansion × the hook's width."""
    k: int | None = None
    """Active latents per token (topk, batchtopk, matryoshka; jumprelu: the target L0) or codes chosen per group (codebook)."""
    l1: float = 0.0
    """L1 coefficient λ (relu)."""
    groups: int = 1
    """Codebook groups: the input is cut into this many equal slices, one codebook each."""
    similarity: str = "cosine"
    """Codebook code choice: cosine (= inner product over the code's norm, Codebook Features' inner_product) or inner (product)."""
    activation: str = "topk"
    """transcoder, skip-transcoder, crosscoder, clt: relu (L1, swept over --l1) | topk | batchtopk | jumprelu (swept over --k); ignored by the SAE kinds."""
    d_out: int = field(default=0, metadata={"flag": False})
    """Coder kinds: width of all target hooks concatenated (0 for the SAE kinds: = d_in)."""
    in_widths: list[int] = field(default_factory=list, metadata={"flag": False, "repeats": True})
    """Coder kinds: width of each input hook, in order (empty for the SAE kinds: [d_in])."""
    out_widths: list[int] = field(default_factory=list, metadata={"flag": False, "repeats": True})
    """Coder kinds: width of each target hook, in order (empty for the SAE kinds: [d_in])."""
    input_norm: str = field(default="scale", metadata={"flag": False})
    """Codebook input: scale (the store's fixed scalar) or layernorm (a learnt LayerNorm per group, as Codebook Features; codes then live in its space)."""

    def __post_init__(self):
        check_fields(self)  # ranges (k, groups positive; no NaN), as for every config
        if self.kind not in KINDS + LOADED_KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind in ("topk", "batchtopk", "codebook", "matryoshka") and self.k is not None and self.d_dict:
            per = self.d_dict // max(self.groups, 1)
            if self.k >= per:
                raise ValueError(f"k={self.k} must be smaller than the number of latents ({per}{' per group' if self.groups > 1 else ''})")
        if self.groups > 1:
            if self.kind != "codebook":
                raise ValueError("groups > 1 is only for kind=codebook")
            if self.d_in and self.d_in % self.groups:
                raise ValueError(f"d_in={self.d_in} is not divisible by groups={self.groups}")
            if self.d_dict and self.d_dict % self.groups:
                raise ValueError(f"d_dict={self.d_dict} is not divisible by groups={self.groups}")
        if self.similarity not in ("cosine", "inner"):
            raise ValueError(f"similarity {self.similarity!r} is not cosine or inner")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.kind in CODER_KINDS and self.d_dict:
            if self.in_widths and sum(self.in_widths) != self.d_in or self.out_widths and sum(self.out_widths) != self.d_out:
                raise ValueError(f"in_widths {self.in_widths} / out_widths {self.out_widths} do not add up to d_in={self.d_in} / d_out={self.d_out}")
            if self.kind == "clt" and (len(self.in_widths) != len(self.out_widths) or self.d_dict % max(len(self.in_widths), 1)):
                raise ValueError(f"clt: {len(self.in_widths)} input and {len(self.out_widths)} output layers, d_dict={self.d_dict}: "
                                 "give one MLP input and one MLP output per layer, and a d_dict divisible by the layers")
            per = self.d_dict // max(len(self.in_widths), 1) if self.kind == "clt" else self.d_dict
            if self.activation != "relu" and self.k is not None and self.k >= per:
                raise ValueError(f"k={self.k} must be smaller than the number of latents ({per}{' per layer' if self.kind == 'clt' else ''})")
        if self.input_norm not in ("scale", "layernorm"):
            raise ValueError(f"input_norm {self.input_norm!r} is not scale or layernorm")
        if self.input_norm == "layernorm" and self.kind != "codebook":
            raise ValueError("input_norm=layernorm is only for kind=codebook")


@dataclass
class Provenance:
    """Where a dictionary's inputs came from; splicing refuses a mismatch."""

    hook: str | None = None
    model: dict | None = None
    """ModelInfo.to_dict() of the model the store was harvested from (includes `compat`)."""
    hook_shape: list[int] = field(default_factory=list)
    """Per-position shape of the hook before flattening (e.g. [n_heads, d_head])."""
    scale: float = 1.0
    """Inputs are multiplied by this before encoding and outputs divided by it after decoding."""
    store: str | None = None
    """The store it was trained on (path as given)."""
    in_hooks: list[str] = field(default_factory=list)
    """Hooks the dictionary reads, in order (empty: [hook]); `hook` is in_hooks[0] for old readers."""
    out_hooks: list[str] = field(default_factory=list)
    """Hooks it predicts, in order (empty: [hook])."""
    in_scales: list[float] = field(default_factory=list)
    """The store's scale of each input hook (x_n = scale · x), in in_hooks order (empty: [scale])."""
    out_scales: list[float] = field(default_factory=list)
    """The store's scale of each output hook (outputs are divided by it), in out_hooks order (empty: [scale])."""


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    """Reconstruction in the hook's original scale, (n_tok, d_in)."""
    codes: Tensor
    """Dense codes, (n_tok, d_dict): non-zero where a latent (or code) fired."""


class TrainOutput(NamedTuple):
    """What one training step of a kind returns (all tensors: the trainer syncs with the device only to log)."""

    loss: Tensor
    """Scalar the optimiser minimises (sum of the terms)."""
    terms: dict[str, Tensor]
    """Named loss terms (scalars, detached copies are logged)."""
    fired: Tensor
    """(d_dict,) bool: which latents fired on this batch (for dead-latent tracking)."""
    l0: Tensor
    """Scalar: mean number of active latents per token on this batch."""


class Dictionary(nn.Module):
    """Base class: subclasses implement `encode_n`, `decode_n` and `loss_terms` on normalised inputs.

    The kind protocol (what the training engine calls; every kind gets these defaults):
    `training_forward(xn, **state) -> TrainOutput` (required to train), `reset_parameters(generator)`,
    `init_from_data(xn)`, `before_step()` / `after_step()` around the optimiser step (e.g. the
    decoder projection), `resample_dead(dead, xn, generator) -> {param name: rows whose Adam
    moments to reset}` and `param_groups(lr)`.
    """

    kind: ClassVar[str] = ""

    def __init__(self, cfg: DictConfig, prov: Provenance | None = None):
        super().__init__()
        self.cfg = cfg
        self.prov = prov or Provenance()
        self.summary: dict = {}
        self.train_config: dict = {}
        self.register_buffer("scale", torch.tensor(float(self.prov.scale)))

    # --- to implement, in normalised space -------------------------------------------------
    def encode_n(self, xn: Tensor) -> Tensor:
        raise NotImplementedError

    def decode_n(self, f: Tensor) -> Tensor:
        raise NotImplementedError

    def loss_terms(self, xn: Tensor, **state) -> dict[str, Tensor]:
        """Named loss terms on a normalised batch; the trainer minimises their sum under key 'loss'."""
        raise NotImplementedError

    @property
    def W_dec(self) -> Tensor:
        """Decoder directions (d_dict, d_in) in normalised space."""
        raise NotImplementedError

    # --- training protocol (the engine calls these; defaults do nothing) --------------------
    def training_forward(self, xn: Tensor, **state) -> TrainOutput:
        """One training step's loss on a normalised batch; `state` holds the run's dead mask, λ schedule, AuxK settings."""
        raise SaekitError(f"dictionaries of kind {self.cfg.kind!r} cannot be trained; train one of {', '.join(KINDS)}")

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Random initial weights from `generator`."""

    def init_from_data(self, xn: Tensor) -> None:
        """Data-dependent initialisation from a sample of normalised rows (b_dec, k-means codes)."""

    def before_step(self) -> None:
        """After backward, before the optimiser step (e.g. remove the gradient along unit decoder rows)."""

    def after_step(self) -> None:
        """After the optimiser step (e.g. renormalise decoder rows)."""

    def resample_dead(self, dead: Tensor, xn: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Replace dead latents; returns {parameter name: bool rows} whose Adam moments are reset ({}: none)."""
        return {}

    weight_lr_scale: ClassVar[float] = 1.0
    """The matrices' (2-D parameters') Adam learning rate is this × the run's lr; vectors take the lr itself."""

    def param_groups(self, lr: float) -> list[dict]:
        """Adam parameter groups: matrices at lr × `weight_lr_scale`, vectors (biases) at lr, in `parameters()` order within each."""
        params = list(self.parameters())
        if self.weight_lr_scale == 1.0:
            return [{"params": params, "lr": lr}]
        return [{"params": [p for p in params if p.dim() >= 2], "lr": lr * self.weight_lr_scale},
                {"params": [p for p in params if p.dim() < 2], "lr": lr}]

    # --- public, original scale ---------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        return self.encode_n(x.to(self.scale.dtype) * self.scale)

    def decode(self, f: Tensor) -> Tensor:
        return self.decode_n(f) / self.scale

    def forward(self, x: Tensor) -> ForwardOutput:
        shape = x.shape
        f = self.encode(x.reshape(-1, shape[-1]))
        return ForwardOutput(self.decode(f).reshape(shape), f.reshape(*shape[:-1], -1))

    def directions(self) -> Tensor:
        """Each latent's decoder vector in the hook's original scale, (d_dict, d_in)."""
        return self.W_dec / self.scale

    # --- several hooks (issue 19: transcoders, crosscoders, CLTs); an SAE reads and writes prov.hook ----
    @property
    def in_hooks(self) -> list[str]:
        """The hooks `encode_hooks` reads, in order."""
        return list(self.prov.in_hooks) or [self.prov.hook]

    @property
    def out_hooks(self) -> list[str]:
        """The hooks `decode_hooks` predicts, in order."""
        return list(self.prov.out_hooks) or [self.prov.hook]

    def encode_hooks(self, inputs: dict[str, Tensor]) -> Tensor:
        """Codes (n, d_dict) from {hook: (n, width)} in the hooks' original units; a missing hook contributes nothing."""
        hook = self.in_hooks[0]
        if hook not in inputs:
            raise SaekitError(f"encode_hooks: the {self.cfg.kind} dictionary reads hook {hook!r}, not given")
        return self.encode(inputs[hook])

    def decode_hooks(self, codes: Tensor) -> dict[str, Tensor]:
        """{out hook: prediction (n, width)} in original units, from codes (n, d_dict)."""
        return {self.out_hooks[0]: self.decode(codes)}

    def predict(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """decode_hooks(encode_hooks(inputs)): what a splice writes into every out hook."""
        return self.decode_hooks(self.encode_hooks(inputs))

    # --- files ----------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.cfg.kind,
            "arch": dataclasses.asdict(self.cfg),
            "provenance": dataclasses.asdict(self.prov) | {"scale": float(self.scale)},
            "train": self.train_config,
            "summary": self.summary,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write config.json + weights.safetensors atomically (temp names, then rename)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic(out / "weights.safetensors") as tmp:
            save_file(tensors, tmp)
        write_json(out / "config.json", self.config_dict())
        return out
