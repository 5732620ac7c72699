"""Dictionary kinds behind one interface: relu, topk, batchtopk SAEs (`sae`), k-sparse codebooks
(`codebook`), jumprelu (`jumprelu`), and the several-hook kinds transcoder, skip-transcoder,
crosscoder, clt (`coders`); `base` declares the interface and the kind
protocol the training engine calls, `fast` the CPU fast paths, `kernels` their numba kernels.

Folders of other tools are read by `saekit.interop.load` (which imports this package, never
the reverse).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from saekit.dictionaries.base import FORMAT, KINDS, LOADED_KINDS, DictConfig, Dictionary, ForwardOutput, Provenance, TrainOutput
from saekit.dictionaries.codebook import Codebook
from saekit.dictionaries.coders import Crosscoder, CrossLayerTranscoder, SkipTranscoder, Transcoder
from saekit.dictionaries.jumprelu import JumpReLUSAE
from saekit.dictionaries.matryoshka import MatryoshkaSAE
from saekit.dictionaries.sae import BatchTopKSAE, ReluSAE, TopKSAE
from saekit import schema
from saekit.errors import SaekitError

REGISTRY: dict[str, type[Dictionary]] = {"relu": ReluSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE, "codebook": Codebook,
                                         "jumprelu": JumpReLUSAE, "matryoshka": MatryoshkaSAE,
                                         "transcoder": Transcoder, "skip-transcoder": SkipTranscoder, "crosscoder": Crosscoder,
                                         "clt": CrossLayerTranscoder}
"""kind name → class (a dict literal, not an import-time registry); KINDS are trained, LOADED_KINDS only read."""


def build(cfg: DictConfig, prov: Provenance | None = None) -> Dictionary:
    return REGISTRY[cfg.kind](cfg, prov)


def load_saekit(path: str | os.PathLike, device: str | torch.device = "cpu") -> Dictionary:
    """Load a saekit dictionary folder, strictly: missing or unexpected tensors are an error."""
    p = Path(path)
    cfg_file, w_file = p / "config.json", p / "weights.safetensors"
    if not cfg_file.is_file() or not w_file.is_file():
        raise SaekitError(f"{p} is not a saekit dictionary (expected config.json and weights.safetensors)")
    raw = schema.check_dictionary_config(schema.read_json(cfg_file, "dictionary folder"), cfg_file)
    if raw.get("format") != FORMAT:
        raise SaekitError(f"{cfg_file} has format {raw.get('format')!r}, expected {FORMAT!r}")
    try:
        cfg = DictConfig(**raw["arch"])
    except (TypeError, ValueError) as e:
        raise SaekitError(f"{cfg_file}: bad architecture: {e}") from None
    prov_fields = {f.name for f in dataclasses.fields(Provenance)}
    prov = Provenance(**{k: v for k, v in raw.get("provenance", {}).items() if k in prov_fields})
    with torch.device("meta"):  # the shapes the config implies, checked against the file's header before allocating
        want = {k: tuple(v.shape) for k, v in build(cfg, prov).state_dict().items()}
    schema.check_tensors(w_file, want, config=str(cfg_file))
    d = build(cfg, prov)
    d.load_state_dict(load_file(str(w_file), device=str(device)))
    d.summary = raw.get("summary", {})
    d.train_config = raw.get("train", {})
    return d.to(device).eval()


__all__ = ["KINDS", "LOADED_KINDS", "REGISTRY", "DictConfig", "Dictionary", "ForwardOutput", "Provenance", "TrainOutput",
           "build", "load_saekit"]
