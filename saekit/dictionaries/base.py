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
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saekit.errors import SaekitError

FORMAT = "saekit-dictionary"
VERSION = 1
KINDS = ("relu", "topk", "batchtopk", "codebook", "jumprelu", "matryoshka")
LOADED_KINDS: tuple[str, ...] = ()  # kinds read from other formats but not trained (none since jumprelu trains)


@dataclass
class DictConfig:
    """Architecture of one dictionary (saved in config.json, nested in the training config)."""

    kind: str = "topk"
    """relu | topk | batchtopk | codebook | jumprelu | matryoshka."""
    d_in: int = 0
    """Width of the hook's activation vector (heads flattened)."""
    d_dict: int = 0
    """Number of latents (codebook: codes in all groups together)."""
    k: int | None = None
    """Active latents per token (topk, batchtopk, matryoshka; jumprelu: the target L0) or codes chosen per group (codebook)."""
    l1: float = 0.0
    """L1 coefficient λ (relu)."""
    groups: int = 1
    """Codebook groups: the input is cut into this many equal slices, one codebook each."""
    similarity: str = "cosine"
    """Codebook code choice: cosine or inner (product)."""

    def __post_init__(self):
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


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    """Reconstruction in the hook's original scale, (n_tok, d_in)."""
    codes: Tensor
    """Dense codes, (n_tok, d_dict): non-zero where a latent (or code) fired."""


class Dictionary(nn.Module):
    """Base class: subclasses implement `encode_n`, `decode_n` and `loss_terms` on normalised inputs."""

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
        save_file(tensors, out / "weights.safetensors.tmp")
        (out / "config.json.tmp").write_text(json.dumps(self.config_dict(), indent=2))
        os.replace(out / "weights.safetensors.tmp", out / "weights.safetensors")
        os.replace(out / "config.json.tmp", out / "config.json")
        return out


def registry() -> dict[str, type[Dictionary]]:
    """kind name → class (a dict literal, not an import-time registry)."""
    from saekit.dictionaries.codebook import Codebook
    from saekit.dictionaries.matryoshka import MatryoshkaSAE
    from saekit.dictionaries.sae import BatchTopKSAE, ReluSAE, TopKSAE

    from saekit.interop.jumprelu import JumpReLUSAE

    return {"relu": ReluSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE, "codebook": Codebook, "jumprelu": JumpReLUSAE,
            "matryoshka": MatryoshkaSAE}


def build(cfg: DictConfig, prov: Provenance | None = None) -> Dictionary:
    return registry()[cfg.kind](cfg, prov)


def load_saekit(path: str | os.PathLike, device: str | torch.device = "cpu") -> Dictionary:
    """Load a saekit dictionary folder, strictly: missing or unexpected tensors are an error."""
    p = Path(path)
    cfg_file, w_file = p / "config.json", p / "weights.safetensors"
    if not cfg_file.is_file() or not w_file.is_file():
        raise SaekitError(f"{p} is not a saekit dictionary (expected config.json and weights.safetensors)")
    raw = json.loads(cfg_file.read_text())
    if raw.get("format") != FORMAT:
        raise SaekitError(f"{cfg_file} has format {raw.get('format')!r}, expected {FORMAT!r}")
    try:
        cfg = DictConfig(**raw["arch"])
    except (TypeError, ValueError) as e:
        raise SaekitError(f"{cfg_file}: bad architecture: {e}") from None
    prov_fields = {f.name for f in dataclasses.fields(Provenance)}
    prov = Provenance(**{k: v for k, v in raw.get("provenance", {}).items() if k in prov_fields})
    d = build(cfg, prov)
    state = load_file(str(w_file), device=str(device))
    missing = set(d.state_dict()) - set(state)
    unexpected = set(state) - set(d.state_dict())
    if missing or unexpected:
        raise SaekitError(f"{w_file}: missing tensors {sorted(missing)}, unexpected {sorted(unexpected)}")
    for k, v in d.state_dict().items():
        if v.shape != state[k].shape:
            raise SaekitError(f"{w_file}: tensor {k} has shape {tuple(state[k].shape)}, config says {tuple(v.shape)}")
    d.load_state_dict(state)
    d.summary = raw.get("summary", {})
    d.train_config = raw.get("train", {})
    return d.to(device).eval()
