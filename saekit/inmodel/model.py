"""The Hugging Face model that in-model training runs: loading (with hook sites), saving, scoring, sampling.

`lm_score` is the held-out loss/accuracy of the talk's table; `sample_rows` collects the
activations that set each new codebook's scale and k-means initialisation.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from saekit import metrics
from saekit.inmodel.codebooks import InModelCodebook
from saekit.inmodel.data import TokenData
from saekit.inmodel.sites import Site, Splicer, hook_site
from saekit.runs import atomic
from saekit.tokens import model_input, scored_mask, row_mask


class InModel(NamedTuple):
    hf: nn.Module
    """The Hugging Face causal LM that is trained."""
    tokenizer: Any
    path: str
    """Directory (or Hub name) it was loaded from."""
    info: Any
    """ModelInfo of the original model."""
    bos_id: int
    sites: dict[str, Site]
    shapes: dict[str, list[int]]


def load_in_model(name: str, hooks: list[str], device: torch.device) -> InModel:
    """The HF model to train plus, from the TransformerLens bridge, the hook sites and per-position shapes."""
    from transformers import AutoModelForCausalLM

    from saekit.models import load_model, resolve_hooks, resolve_model_path

    loaded = load_model(name)
    specs = resolve_hooks(loaded, hooks)
    sites = {h: hook_site(loaded.bridge.adapter, h) for h in hooks}
    bos = loaded.bos_id
    info, tok = loaded.info, loaded.tokenizer
    del loaded  # the bridge only served the hook map and shapes
    path = resolve_model_path(name)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    hf.eval()  # dropout off: short fine-tunes, and a resumed run reproduces an uninterrupted one
    return InModel(hf, tok, path, info, bos, sites, {s.name: list(s.shape) for s in specs})


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".index.json")


def save_hf_model(hf: nn.Module, tokenizer, source: str, dest: Path) -> Path:
    """Write a normal HF model directory atomically; extra files of the source (e.g. the toy's fsm.json) are copied,
    but not its README.md: that model card describes the source model, not this one."""
    with atomic(dest) as tmp:
        hf.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        src = Path(source)
        if src.is_dir():
            for f in src.iterdir():
                if f.is_file() and f.name != "README.md" and not (tmp / f.name).exists() and not f.name.endswith(WEIGHT_SUFFIXES):
                    shutil.copy2(f, tmp / f.name)
    return dest


def model_info_of(path: Path, like) -> dict:
    """ModelInfo dict of a written model directory (same shape as the original, new fingerprint)."""
    from saekit.models import fingerprint

    return dataclasses.replace(like, name=str(path), fingerprint=fingerprint(str(path)), compat=False).to_dict()


# --- evaluation ---------------------------------------------------------------------------------

class LMScore(NamedTuple):
    loss: float
    """Mean next-token cross-entropy (nats) over scored positions."""
    accuracy: float
    """Share of scored positions where the argmax is the next token."""
    tokens: int


@torch.no_grad()
def lm_score(hf: nn.Module, tokens: np.ndarray, bos_id: int, batch_size: int = 8,
             splicer: Splicer | None = None, layers: dict[str, InModelCodebook] | None = None,
             skip_bos: bool = True) -> LMScore:
    """Held-out loss and accuracy, with the codebooks in `layers` active when given."""
    dev = next(hf.parameters()).device
    ce_sum = acc_sum = n = 0.0
    for i in range(0, tokens.shape[0], batch_size):
        t = torch.as_tensor(tokens[i:i + batch_size], dtype=torch.long, device=dev)
        logits = spliced_logits(hf, t, bos_id, splicer, layers, skip_bos)
        m = scored_mask(t)
        inp = model_input(t, bos_id)
        ce_sum += (metrics.ce_per_token(logits, inp) * m).sum().item()
        acc_sum += (metrics.correct_per_token(logits, inp) * m).sum().item()
        n += m.sum().item()
    return LMScore(ce_sum / max(n, 1), acc_sum / max(n, 1), int(n))


def spliced_logits(hf, t: Tensor, bos_id: int, splicer: Splicer | None, layers: dict[str, InModelCodebook] | None,
                   skip_bos: bool) -> Tensor:
    """Logits of token batch t (B, T, PAD = -1), with the codebooks in `layers` active at row_mask positions when given."""
    inp = model_input(t, bos_id)
    if not layers:
        return hf(input_ids=inp).logits
    mask = row_mask(t, skip_bos)
    for layer in layers.values():
        layer.mask = mask
    with splicer.active({h: layer for h, layer in layers.items()}):
        return hf(input_ids=inp).logits


@torch.no_grad()
def sample_rows(hf: nn.Module, splicer: Splicer, hooks: list[str], data: TokenData, bos_id: int, rows: int,
                batch_size: int, skip_bos: bool) -> dict[str, Tensor]:
    """Activation rows (n, width) of each hook at spliced positions: up to `rows`, at most one pass over the training set."""
    got: dict[str, list[Tensor]] = {h: [] for h in hooks}
    dev = next(hf.parameters()).device
    n = 0
    for i in range(0, data.train.shape[0], batch_size):
        if n >= rows:
            break
        t = torch.as_tensor(data.train[i:i + batch_size], dtype=torch.long, device=dev)
        mask = row_mask(t, skip_bos)

        def saver(h):
            def fn(x):
                got[h].append(x[mask].float())
                return x

            return fn

        with splicer.active({h: saver(h) for h in hooks}):
            hf(input_ids=model_input(t, bos_id))
        n += int(mask.sum())
    return {h: torch.cat(v)[:rows] for h, v in got.items()}
