"""Gemma Scope folders (`params.npz`) as saekit `jumprelu` dictionaries.

Google's Gemma Scope repositories (google/gemma-scope-2b-pt-res, ...) hold one folder per
SAE, `layer_L/width_W/average_l0_N/params.npz`, with `W_enc` (d_in, d_sae), `W_dec`
(d_sae, d_in), `b_enc`, `b_dec` and `threshold`, run as

    pre = x @ W_enc + b_enc;   f = ReLU(pre) · [pre > threshold];   x̂ = f @ W_dec + b_dec

(no b_dec subtracted before encoding: `apply_b_dec_to_input` = 0 in saekit's jumprelu).  The
file names no hook or model, so they are read from the path: the repository name
(`gemma-scope-2b-pt-res`, also inside the Hugging Face cache's `models--google--gemma-scope-2b-pt-res`)
gives the model and the site (res → hook_resid_post, mlp → hook_mlp_out, att → attn.hook_z),
`layer_L` the layer.  The `.npz` is read with `allow_pickle=False`: loading runs no code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from saekit.errors import SaekitError

FILE = "params.npz"
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
SITES = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att)")


def hook_and_model(folder: Path) -> tuple[str | None, str | None]:
    """(hook, model name) read from the folder's path, None where the path does not say."""
    text = str(folder.resolve()) + "/" + str(folder)
    repo = _REPO.search(text)
    layer = re.search(r"layer_(\d+)", text)
    hook = f"blocks.{layer.group(1)}.{SITES[repo.group(3)]}" if repo and layer else None
    model = f"google/gemma-2-{repo.group(1)}{'-it' if repo.group(2) == 'it' else ''}" if repo else None
    return hook, model


def load_gemmascope(path: str | os.PathLike, device: str | torch.device = "cpu"):
    from saekit.dictionaries import DictConfig, Provenance, build

    folder = Path(path)
    try:
        with np.load(folder / FILE, allow_pickle=False) as z:
            t = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float32)) for k in KEYS if k in z.files}
            found = sorted(z.files)
    except (OSError, ValueError) as e:
        raise SaekitError(f"{folder / FILE} is not a readable Gemma Scope params.npz ({e}); download it again") from None
    missing = [k for k in KEYS if k not in t]
    if missing:
        raise SaekitError(f"{folder / FILE} lacks {', '.join(missing)} (found {', '.join(found)}); it is not a Gemma Scope SAE")
    d_in, d_sae = t["W_enc"].shape
    shapes = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    bad = [f"{k} {tuple(t[k].shape)} (expected {s})" for k, s in shapes.items() if tuple(t[k].shape) != s]
    if bad:
        raise SaekitError(f"{folder / FILE}: shapes disagree with W_enc {(d_in, d_sae)}: {'; '.join(bad)}")
    hook, model = hook_and_model(folder)
    prov = Provenance(hook=hook, model={"name": model, "compat": False} if model else None, scale=1.0)
    d = build(DictConfig(kind="jumprelu", d_in=d_in, d_dict=d_sae), prov)
    state = {**t, "apply_b_dec_to_input": torch.tensor(0.0), "scale": torch.tensor(1.0),
             "l0_coef": torch.tensor(1.0)}  # saekit's training state (λ), not part of Gemma Scope's files
    own = d.state_dict()
    d.load_state_dict({name: state[name].to(own[name].dtype).reshape(own[name].shape) for name in own})
    d.summary = {"source": {"format": "gemmascope", "path": str(folder),
                            "notes": [] if hook else ["hook not found in the path (expected gemma-scope-…-res|mlp|att/layer_L/…)"]}}
    return d.to(device).eval()
