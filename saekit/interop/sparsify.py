"""sparsify (EleutherAI) SAE folders in: `cfg.json` + `sae.safetensors`.

`SparseCoder.save_to_disk` writes the `SparseCoderConfig` fields plus `d_in` to cfg.json
and the module's state to sae.safetensors:

    encoder.weight (n, d_in)   encoder.bias (n,)   W_dec (n, d_in)   b_dec (d_in,)   [W_skip (d_in, d_in)]

with n = num_latents or d_in · expansion_factor.  Its `encode` + `decode` are

    pre = ReLU((x − b_dec) @ encoder.weightᵀ + encoder.bias)     (no b_dec subtraction when transcode)
    f   = the k largest of pre per token                         (activation "topk")
    x̂   = f @ W_dec + b_dec                                     (+ x @ W_skipᵀ with a skip connection)

which is saekit's `topk` kind with W_enc = encoder.weightᵀ (TopK of ReLU(pre) and ReLU of
TopK(pre) give the same codes).  Transcoders (`transcode: true`, with or without W_skip)
load as saekit transcoders (`load_sparsify_transcoder`); an SAE with a skip connection and the
"groupmax" activation have no saekit kind and are refused.

A sparsify run saves one folder per hookpoint, named after the Hugging Face module
(`layers.6`, `h.6.mlp`, `gpt_neox.layers.3.attention`), beside the run's `config.json`
(which names the model).  sparsify hooks a module's output on the raw HF model, so the
folder name maps to the TransformerLens hook `blocks.L.hook_resid_post` (the layer),
`blocks.L.hook_mlp_out` or `blocks.L.hook_attn_out`, without weight processing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from saekit import schema
from saekit.dictionaries import build
from saekit.dictionaries.coders import coder_from_tensors
from saekit.dictionaries.base import DictConfig, Dictionary, Provenance
from saekit.errors import SaekitError
from saekit.interop.saelens import _read_json, _read_tensors

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

# cfg.json fields saekit reads (SparseCoderConfig + d_in), checked before use.
CFG_SCHEMA = {
    "d_in": schema.Int(min=1), "k": schema.Int(min=1, required=False), "num_latents": schema.Int(min=0, required=False),
    "expansion_factor": schema.Int(min=1, required=False), "transcode": schema.Field("bool", required=False),
    "skip_connection": schema.Field("bool", required=False), "activation": schema.Str(required=False),
    "normalize_decoder": schema.Field("bool", required=False),
}

_LAYER = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|layer)\.(\d+)(?:\.(.+))?$")
_SUBMODULES = {
    "": "hook_resid_post",
    "mlp": "hook_mlp_out",
    "feed_forward": "hook_mlp_out",
    "self_attn": "hook_attn_out",
    "attn": "hook_attn_out",
    "attention": "hook_attn_out",
}


def hook_from_hookpoint(hookpoint: str) -> str | None:
    """sparsify hookpoint (an HF module name) → TransformerLens hook name, or None if it has no clear equivalent."""
    m = _LAYER.match(hookpoint)
    if not m:
        return None
    sub = _SUBMODULES.get(m.group(2) or "")
    return f"blocks.{int(m.group(1))}.{sub}" if sub else None


def load_sparsify(path: str | os.PathLike, device: str | torch.device = "cpu") -> Dictionary:
    """Load a sparsify SAE folder as a saekit `topk` dictionary with sparsify's encode and decode."""
    folder = Path(path)
    raw = _read_json(folder / CFG_FILE)
    where = folder / CFG_FILE
    schema.check(raw, CFG_SCHEMA, str(where))
    d_in = raw["d_in"]
    if raw.get("transcode"):  # a (skip) transcoder (below)
        return load_sparsify_transcoder(folder, raw, device)
    if raw.get("skip_connection"):
        raise SaekitError(f"{folder} has a skip connection (W_skip), which no saekit kind has; use sparsify for it")
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise SaekitError(f"{where}: sparsify activation {activation!r} is not supported; saekit reads activation 'topk'")
    n = raw.get("num_latents") or d_in * raw.get("expansion_factor", 32)
    k = raw.get("k", 32)
    if not k < n:
        raise SaekitError(f"{where}: k={k!r} must be below the number of latents ({n})")

    w_file = folder / WEIGHTS_FILE
    want = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    schema.check_tensors(w_file, want, config=f"cfg.json (d_in={d_in}, {n} latents)")
    t = _read_tensors(w_file)

    hookpoint = folder.resolve().name
    hook = hook_from_hookpoint(hookpoint)
    model_name = None
    run_cfg = folder.resolve().parent / "config.json"
    if run_cfg.is_file():
        try:
            model_name = json.loads(run_cfg.read_text()).get("model")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            model_name = None
    prov = Provenance(hook=hook, model={"name": model_name, "compat": False} if model_name else None)
    d = build(DictConfig(kind="topk", d_in=d_in, d_dict=n, k=k), prov)
    own = d.state_dict()
    state = {
        "W_enc": t["encoder.weight"].t().contiguous(),  # (d_in, n)
        "b_enc": t["encoder.bias"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
        "scale": torch.tensor(1.0),
    }
    d.load_state_dict({name: state[name].to(own[name].dtype) for name in own})
    d.summary = {
        "source": {
            "format": "sparsify",
            "path": str(folder),
            "hookpoint": hookpoint,
            "notes": [] if hook else [f"hookpoint {hookpoint!r} has no known TransformerLens hook name; set it yourself"],
        }
    }
    return d.to(device).eval()


# --- transcoders -------------------------------------------------------------------------------------
# sparsify transcoders (cfg.json `transcode: true` + sae.safetensors; `SparseCoder`):
# 
#     encoder.weight (n, d)  encoder.bias (n,)  W_dec (n, d)  b_dec (d,)  [W_skip (d, d)]
#     f = TopK_k(ReLU(x @ encoder.weightᵀ + encoder.bias));  ŷ = f @ W_dec + b_dec [+ x @ W_skipᵀ]
# 
# (no b_dec subtraction when transcoding) = saekit's transcoder/skip-transcoder with the topk
# activation.  The hookpoint `layers.L.mlp` reads the MLP's input and writes its output:
# `blocks.L.mlp.hook_in` → `blocks.L.hook_mlp_out`.

def load_sparsify_transcoder(folder: Path, raw: dict, device: str | torch.device = "cpu") -> Dictionary:
    """A sparsify transcoder folder (`transcode: true`, W_skip if `skip_connection`) as a saekit (skip-)transcoder."""

    where = folder / "cfg.json"
    d = raw["d_in"]
    if raw.get("activation", "topk") != "topk":
        raise SaekitError(f"{where}: sparsify activation {raw.get('activation')!r} is not supported; saekit reads activation 'topk'")
    n = raw.get("num_latents") or d * raw.get("expansion_factor", 32)
    k = raw.get("k", 32)
    if not k < n:
        raise SaekitError(f"{where}: k={k!r} must be below the number of latents ({n})")
    skip = bool(raw.get("skip_connection"))
    w_file = folder / WEIGHTS_FILE
    want = {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)} | ({"W_skip": (d, d)} if skip else {})
    schema.check_tensors(w_file, want, config=f"cfg.json (d_in={d}, {n} latents, transcode)")
    t = _read_tensors(w_file)
    state = {"W_enc": t["encoder.weight"].t(), "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if skip:
        state["W_skip"] = t["W_skip"].t()  # sparsify adds x @ W_skipᵀ; saekit x @ W_skip
    hookpoint = folder.resolve().name
    m = _LAYER.match(hookpoint)
    notes = []
    if m and (m.group(2) or "") in ("mlp", "feed_forward"):
        hook_in, hook_out = f"blocks.{int(m.group(1))}.mlp.hook_in", f"blocks.{int(m.group(1))}.hook_mlp_out"
    else:
        hook_in = hook_out = None
        notes.append(f"hookpoint {hookpoint!r} is not an MLP module saekit knows; set the input and output hooks yourself")
    run_cfg = folder.resolve().parent / "config.json"
    model_name = None
    if run_cfg.is_file():
        try:
            model_name = json.loads(run_cfg.read_text()).get("model")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            model_name = None
    prov = Provenance(hook=hook_in, in_hooks=[hook_in] if hook_in else [], out_hooks=[hook_out] if hook_out else [],
                      model={"name": model_name, "compat": False} if model_name else None)
    out = coder_from_tensors("skip-transcoder" if skip else "transcoder", "topk", d, d, n, prov, state, k=k)
    out.summary = {"source": {"format": "sparsify", "path": str(folder), "hookpoint": hookpoint, "notes": notes}}
    return out.to(device).eval()
