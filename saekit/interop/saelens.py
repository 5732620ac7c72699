"""SAELens SAE folders in and out: `cfg.json` + `sae_weights.safetensors`.

SAELens (v6, `SAE.save_model` / `SAE.load_from_disk`) stores, for every architecture,

    W_enc (d_in, d_sae)  b_enc (d_sae,)  W_dec (d_sae, d_in)  b_dec (d_in,)  [threshold (d_sae,)]

and encodes (`SAE.process_sae_in` + each class's `encode`)

    pre = (x − a · b_dec) @ W_enc + b_enc          a = cfg.apply_b_dec_to_input (0 or 1)
    standard: f = ReLU(pre)
    topk:     f = ReLU(TopK_k(pre′)) / n,  pre′ = pre · n,  n = ‖W_dec,i‖ if cfg.rescale_acts_by_decoder_norm else 1
              (decode divides by n again, so f above is what multiplies W_dec)
    jumprelu: f = ReLU(pre) · [pre > threshold]
    x̂ = f @ W_dec + b_dec

`cfg.json` is `SAEConfig.to_dict()`: architecture, d_in, d_sae, dtype, device,
apply_b_dec_to_input, normalize_activations, reshape_activations, k (topk),
rescale_acts_by_decoder_norm (topk) and `metadata` {sae_lens_version, model_name,
hook_name, hook_head_index, model_from_pretrained_kwargs, prepend_bos, context_size, ...}.
Folders written before v6 are flat: hook_name (or hook_point) and model_name at top level,
`activation_fn`/`activation_fn_str` "topk" with `activation_fn_kwargs.k` for TopK, and
`normalize_activations` possibly a bool; SAELens's `handle_pre_6_0_config` converts them
and so does `_read_cfg` here.

Loading maps each folder onto a saekit kind whose formula is the same (relu, topk,
jumprelu); differences that are exact rescalings (decoder-norm rescaled TopK, an old
`scaling_factor` on the latents, apply_b_dec_to_input=false on a ReLU or TopK SAE) are
folded into the weights, which reproduces SAELens's outputs to float rounding; a JumpReLU
keeps the flag itself.  Exporting folds saekit's input scale into the weights the way
SAELens's own `fold_activation_norm_scaling_factor` does (W_enc·s, W_dec/s, b_dec/s), so
SAELens reconstructs in the hook's original units with normalize_activations "none".
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saekit import schema
from saekit.dictionaries import build
from saekit.dictionaries.coders import coder_from_tensors
from saekit.dictionaries.base import CODER_KINDS, DictConfig, Dictionary, Provenance
from saekit.errors import SaekitError
from saekit.runs import atomic, write_text

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
# The layout we write is SAELens's v6 config; its loader treats a folder without a version
# >= 6.0.0-rc.0 as pre-v6 and rewrites it, so the version of the *format* is stated here.
FORMAT_VERSION = "6.0.0"
# SAELens loads models with HookedTransformer.from_pretrained, which folds LayerNorm and
# centres weights by default; saekit's default (compat=False) runs the raw HF weights.
NO_PROCESSING = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False, "fold_value_biases": False}
PER_TOKEN_NORMS = ("constant_norm_rescale", "layer_norm", "covariance_whitening")


# --- reading -----------------------------------------------------------------------------

# cfg.json fields saekit reads, checked before use (SAELens writes more; those pass unchecked).
CFG_SCHEMA = {
    "architecture": schema.Str(required=False, null=True), "d_in": schema.Int(min=1), "d_sae": schema.Int(min=1),
    "k": schema.Int(min=1, required=False, null=True), "metadata": schema.Field("dict", required=False, null=True),
    "apply_b_dec_to_input": schema.Field("bool", required=False), "rescale_acts_by_decoder_norm": schema.Field("bool", required=False),
    "activation_fn": schema.Str(required=False, null=True), "activation_fn_str": schema.Str(required=False, null=True),
    "activation_fn_kwargs": schema.Field("dict", required=False, null=True), "hook_name": schema.Str(required=False, null=True),
    "hook_point": schema.Str(required=False, null=True), "model_name": schema.Str(required=False, null=True),
    "model_from_pretrained_kwargs": schema.Field("dict", required=False, null=True),
}
META_SCHEMA = {key: CFG_SCHEMA[key] for key in ("hook_name", "model_name", "model_from_pretrained_kwargs")} | {
    "hook_head_index": schema.Int(min=0, required=False, null=True), "saekit": schema.Field("dict", required=False, null=True)}
SAEKIT_EXTRA = {"kind": schema.Str(required=False, null=True), "k": schema.Int(min=1, required=False, null=True),
                "provenance": schema.Field("dict", required=False, null=True), "summary": schema.Field("dict", required=False, null=True)}
"""What saekit's own export adds under metadata.saekit, read back on load."""


def _read_json(path: Path) -> dict:
    return schema.read_json(path, "dictionary folder")


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor as float32; call only after `schema.check_tensors` has checked the header."""
    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError) as e:
        raise SaekitError(f"{path} is not a readable safetensors file ({e}); the folder is damaged") from None


def _read_cfg(raw: dict, where: Path) -> dict:
    """SAELens cfg.json (v6 nested or pre-v6 flat) → the fields saekit needs, with SAELens's defaults."""
    schema.check(raw, CFG_SCHEMA, str(where))
    schema.check(raw.get("metadata") or {}, META_SCHEMA, str(where), prefix="metadata.")
    extra = (raw.get("metadata") or {}).get("saekit") or {}
    schema.check(extra, SAEKIT_EXTRA, str(where), prefix="metadata.saekit.")
    schema.check(extra.get("provenance") or {}, schema.PROVENANCE, str(where), prefix="metadata.saekit.provenance.")
    kwargs = raw.get("activation_fn_kwargs") or {}
    schema.check(kwargs, {"k": schema.Int(min=1, required=False, null=True)}, str(where), prefix="activation_fn_kwargs.")
    meta = dict(raw.get("metadata") or {})
    get = lambda key, default=None: meta.get(key, raw.get(key, default))  # noqa: E731
    act_fn = raw.get("activation_fn", raw.get("activation_fn_str"))
    arch = raw.get("architecture") or "standard"
    k = raw.get("k")
    if act_fn == "topk" and (raw.get("activation_fn_kwargs") or {}).get("k") is not None:
        # pre-v6 TopK: SAELens's handle_pre_6_0_config turns it into architecture "topk"
        arch, k = "topk", raw["activation_fn_kwargs"]["k"]
    elif act_fn not in (None, "relu") and arch == "standard":
        raise SaekitError(f"{where}: activation_fn {act_fn!r} is not supported (saekit reads relu and topk SAELens SAEs)")
    if arch not in ARCHITECTURES:
        raise SaekitError(
            f"{where}: SAELens architecture {arch!r} is not supported; saekit reads {', '.join(ARCHITECTURES)} "
            "(convert it with SAELens to one of those, or use SAELens for it)"
        )
    norm = raw.get("normalize_activations", "none")
    if not isinstance(norm, (str, bool, type(None))):  # a string (v6) or a bool (older); nothing else means anything
        raise SaekitError(f"{where}: field normalize_activations is {json.dumps(norm)[:40]}, expected a string; the file is damaged")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    norm = norm or "none"
    for key in ("d_in", "d_sae"):
        if not isinstance(raw.get(key), int) or raw[key] <= 0:
            raise SaekitError(f"{where}: {key} is {raw.get(key)!r}, expected a positive integer; the config is damaged")
    if arch == "topk" and (not isinstance(k, int) or k <= 0):
        raise SaekitError(f"{where}: a topk SAE needs a positive integer k, found {k!r}")
    return {
        "architecture": arch,
        "d_in": raw["d_in"],
        "d_sae": raw["d_sae"],
        "k": k,
        "apply_b_dec_to_input": bool(raw.get("apply_b_dec_to_input", True)),
        "rescale_acts_by_decoder_norm": bool(raw.get("rescale_acts_by_decoder_norm", False)),
        "normalize_activations": norm,
        "hook_name": get("hook_name") or raw.get("hook_point"),
        "hook_head_index": get("hook_head_index", raw.get("hook_point_head_index")),
        "model_name": get("model_name"),
        "model_from_pretrained_kwargs": get("model_from_pretrained_kwargs") or {},
        "saekit": meta.get("saekit"),
        "sae_lens_version": get("sae_lens_version"),
    }


def _check_tensors(cfg: dict, w_file: Path) -> None:
    """The weights file's header against cfg.json, before any tensor is read."""
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if cfg["architecture"] == "jumprelu":
        want["threshold"] = (d_sae,)
    optional = {"scaling_factor": (d_sae,), "finetuning_scaling_factor": (d_sae,)}
    schema.check_tensors(w_file, want, optional=optional, config=f"cfg.json (d_in={d_in}, d_sae={d_sae})")


def _scale_beside(folder: Path, cfg: dict) -> tuple[float, str | None]:
    """Input scale for normalize_activations='expected_average_only_in' (else 1) and a note on how it was found."""
    if cfg["normalize_activations"] != "expected_average_only_in":
        return 1.0, None
    scaler = folder / "activation_scaler.json"
    if scaler.is_file():
        # a scale of 0, Infinity or a string would turn every metric into NaN: refuse it here
        s = schema.check(_read_json(scaler), {"scaling_factor": schema.Num(above=0)}, str(scaler))["scaling_factor"]
        return float(s), f"input scale {s} from {scaler.name} (normalize_activations=expected_average_only_in)"
    # SAELens's load_from_disk applies no scaling here either; only from_pretrained folds a
    # factor it keeps in its registry, which is not in the folder.
    return 1.0, (
        "normalize_activations=expected_average_only_in but no scaling factor in the folder: "
        "inputs are used unscaled, as SAELens's load_from_disk does"
    )


def _compat(kwargs: dict) -> bool:
    """Was the model run with TransformerLens weight processing (SAELens's default) or without?"""
    return not (kwargs.get("fold_ln") is False or kwargs.get("center_writing_weights") is False)


def load_saelens(path: str | os.PathLike, device: str | torch.device = "cpu") -> Dictionary:
    """Load a SAELens SAE folder as a saekit dictionary that reproduces SAELens's encode and decode."""
    folder = Path(path)
    raw = _read_json(folder / CFG_FILE)
    if is_saelens_transcoder(raw):  # transcoders and skip transcoders (below)
        return load_saelens_transcoder(folder, raw, folder / WEIGHTS_FILE, device)
    cfg = _read_cfg(raw, folder / CFG_FILE)
    w_file = folder / WEIGHTS_FILE
    _check_tensors(cfg, w_file)
    t = _read_tensors(w_file)
    if cfg["normalize_activations"] in PER_TOKEN_NORMS:
        raise SaekitError(
            f"{folder}: normalize_activations={cfg['normalize_activations']!r} rescales every token by its own "
            "statistics between encode and decode, which a saekit dictionary cannot represent; use SAELens for it"
        )
    if cfg["normalize_activations"] not in ("none", "expected_average_only_in"):
        raise SaekitError(f"{folder}: unknown normalize_activations {cfg['normalize_activations']!r}")
    if cfg["hook_head_index"] is not None:
        raise SaekitError(
            f"{folder}: this SAE reads a single attention head (hook_head_index={cfg['hook_head_index']}); "
            "saekit dictionaries read a whole hook, so it cannot be spliced or analysed by saekit"
        )

    notes: list[str] = []
    W_enc, b_enc, W_dec, b_dec = t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]
    latent_scale = t.get("finetuning_scaling_factor", t.get("scaling_factor"))
    if latent_scale is not None and not torch.equal(latent_scale, torch.ones_like(latent_scale)):
        # pre-v6 SAEs multiplied the codes by this before decoding: fold it into W_dec's rows
        W_dec = W_dec * latent_scale[:, None]
        notes.append("per-latent scaling_factor folded into W_dec")
    arch = cfg["architecture"]
    if arch == "topk" and cfg["rescale_acts_by_decoder_norm"]:
        # TopK on pre·n and decode of f/n  ≡  TopK with W_enc·n, b_enc·n, W_dec/n (same codes as SAELens returns)
        n = W_dec.norm(dim=-1)  # (d_sae,)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
        notes.append("rescale_acts_by_decoder_norm folded into the weights")
    apply_b_dec = cfg["apply_b_dec_to_input"]
    if not apply_b_dec and arch != "jumprelu":
        # saekit subtracts b_dec before encoding; x W + b  =  (x − b_dec) W + (b + b_dec W)
        b_enc = b_enc + b_dec @ W_enc
        notes.append("apply_b_dec_to_input=false folded into b_enc")

    kind = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    k = cfg["k"] if arch == "topk" else None
    extra = cfg["saekit"] if isinstance(cfg["saekit"], dict) else {}
    if arch == "jumprelu" and extra.get("kind") in ("batchtopk", "matryoshka"):
        thr = t["threshold"]
        if apply_b_dec and torch.all(thr == thr[0]) and isinstance(extra.get("k"), int):
            # saekit's own batchtopk, exported as jumprelu with one threshold: restore it as it was
            kind, k = extra["kind"], extra["k"]
            state["threshold"] = thr[0].clone()
    if kind == "jumprelu":
        state["threshold"] = t["threshold"]
        state["apply_b_dec_to_input"] = torch.tensor(1.0 if apply_b_dec else 0.0)
        state["l0_coef"] = torch.tensor(1.0)  # saekit's training state (λ), not part of SAELens's format
    if kind == "topk" and k >= cfg["d_sae"]:
        raise SaekitError(f"{folder}: k={k} must be smaller than d_sae={cfg['d_sae']}")

    scale, note = _scale_beside(folder, cfg)
    if note:
        notes.append(note)
    prov_fields = {f.name for f in dataclasses.fields(Provenance)}
    restored = {key: v for key, v in (extra.get("provenance") or {}).items() if key in prov_fields and key != "scale"}
    model = restored.pop("model", None) or (
        {"name": cfg["model_name"], "compat": _compat(cfg["model_from_pretrained_kwargs"])} if cfg["model_name"] else None
    )
    prov = Provenance(**{"hook": cfg["hook_name"], **restored, "model": model, "scale": scale})
    d = build(DictConfig(kind=kind, d_in=cfg["d_in"], d_dict=cfg["d_sae"], k=k), prov)
    state["scale"] = torch.tensor(scale)
    own = d.state_dict()
    d.load_state_dict({name: state[name].to(own[name].dtype).reshape(own[name].shape) for name in own})
    d.summary = dict(extra.get("summary") or {})
    d.summary["source"] = {
        "format": "saelens",
        "path": str(folder),
        "architecture": arch,
        "sae_lens_version": cfg["sae_lens_version"],
        "model_from_pretrained_kwargs": cfg["model_from_pretrained_kwargs"],
        "notes": notes,
    }
    return d.to(device).eval()


# --- the formula SAELens runs, for checking exports ----------------------------------------------

def saelens_forward(cfg: dict, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
    """SAELens's reconstruction x̂ (n, d_in) of x (n, d_in) for a v6 cfg.json dict (standard, topk, jumprelu)."""
    a = 1.0 if cfg.get("apply_b_dec_to_input", True) else 0.0
    W_dec = tensors["W_dec"]
    pre = (x - a * tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        f = pre.relu()
    elif arch == "topk":
        n = W_dec.norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else torch.ones_like(pre[0])
        vals, idx = (pre * n).topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu()) / n
    elif arch == "jumprelu":
        f = pre.relu() * (pre > tensors["threshold"]).to(pre.dtype)
    else:
        raise ValueError(f"architecture {arch!r}")
    return f @ W_dec + tensors["b_dec"]


# --- writing -----------------------------------------------------------------------------

def saelens_tensors(d: Dictionary) -> tuple[dict, dict[str, Tensor]]:
    """The SAELens cfg.json dict and tensors for dictionary `d`, with its input scale folded in."""
    kind = d.cfg.kind
    if kind in CODER_KINDS:
        return saelens_transcoder_tensors(d)
    if kind == "codebook":
        raise SaekitError(
            "codebook dictionaries have no SAELens equivalent (SAELens has no k-sparse codebook architecture); "
            "share the saekit folder instead"
        )
    arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "matryoshka": "jumprelu", "jumprelu": "jumprelu"}.get(kind)
    if arch is None:
        raise SaekitError(f"dictionary kind {kind!r} has no SAELens export; exportable kinds: relu, topk, batchtopk, matryoshka, jumprelu")
    sd = {name: v.detach().float().cpu() for name, v in d.state_dict().items()}
    s = float(d.scale)
    # x_n = s·x:  (x_n − b_dec) W_enc = (x − b_dec/s)(s·W_enc),  (f W_dec + b_dec)/s = f (W_dec/s) + b_dec/s
    tensors = {
        "W_enc": sd["W_enc"] * s,
        "b_enc": sd["b_enc"].clone(),
        "W_dec": sd["W_dec"] / s,
        "b_dec": sd["b_dec"] / s,
    }
    apply_b_dec = True
    if kind in ("batchtopk", "matryoshka"):
        # saekit's inference rule ReLU(pre)·[pre > max(θ, 0)] is a JumpReLU with θ on every latent
        theta = max(float(sd["threshold"]), 0.0)
        tensors["threshold"] = torch.full((d.cfg.d_dict,), theta)
    elif kind == "jumprelu":
        tensors["threshold"] = sd["threshold"].clone()
        apply_b_dec = bool(sd["apply_b_dec_to_input"] != 0)
    prov = d.prov
    model = prov.model or {}
    hook = prov.hook or ""
    cfg: dict = {
        "architecture": arch,
        "d_in": d.cfg.d_in,
        "d_sae": d.cfg.d_dict,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook.endswith("hook_z") and len(prov.hook_shape) == 2 else "none",
    }
    if arch == "topk":
        cfg |= {"k": d.cfg.k, "rescale_acts_by_decoder_norm": False}
    train = d.train_config or {}
    cfg["metadata"] = {
        "sae_lens_version": FORMAT_VERSION,
        "sae_lens_training_version": FORMAT_VERSION,
        "model_name": model.get("name"),
        "hook_name": prov.hook,
        "hook_head_index": None,
        "model_from_pretrained_kwargs": {} if model.get("compat") else dict(NO_PROCESSING),
        "prepend_bos": True,
        "context_size": train.get("context_size") if isinstance(train.get("context_size"), int) else None,
        # What SAELens ignores but saekit reads back: where the dictionary came from.
        "saekit": {
            "kind": kind,
            "k": d.cfg.k,
            "provenance": dataclasses.asdict(prov) | {"scale": s},
            "summary": d.summary,
        },
    }
    return cfg, tensors


def export_saelens(d: Dictionary, out: str | os.PathLike, *, check: bool = True) -> Path:
    """Write `d` as a SAELens folder (cfg.json + sae_weights.safetensors) under `out`, atomically.

    With `check`, the written formula is first run on random inputs and compared with
    saekit's own reconstruction, so a folder that would disagree is never written.
    """
    folder = Path(out)
    if (folder / "config.json").is_file() and (folder / "weights.safetensors").is_file():
        raise SaekitError(f"{folder} holds a saekit dictionary; choose an empty or new --out for the SAELens folder")
    cfg, tensors = saelens_tensors(d)
    if check:
        max_err, ref_norm = check_export(d, cfg, tensors)
        if not max_err <= 1e-4 * max(ref_norm, 1.0):
            raise RuntimeError(f"SAELens export of a {d.cfg.kind} dictionary disagrees with saekit by {max_err:.3g} (bug)")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    write_text(folder / CFG_FILE, json.dumps(cfg, indent=2, default=_json_default))
    return folder


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, Tensor):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


@torch.no_grad()
def check_export(d: Dictionary, cfg: dict, tensors: dict[str, Tensor], n: int = 64) -> tuple[float, float]:
    """(max |x̂_saelens − x̂_saekit|, max |x̂_saekit|) on random inputs of the hook's scale."""
    g = torch.Generator().manual_seed(0)
    if d.cfg.kind in CODER_KINDS:  # a transcoder: inputs around its input bias, SAELens's transcoder formula
        xn = torch.randn(n, d.cfg.d_in, generator=g) + d.state_dict()["b_in"].float().cpu()
        x = xn / d.in_scale.cpu()
        ref = d(x.to(d.in_scale.device)).x_hat.float().cpu()
        return float((saelens_transcoder_forward(cfg, tensors, x) - ref).abs().max()), float(ref.abs().max())
    dev = d.scale.device
    s = float(d.scale)
    # Inputs around the decoder bias with typical norm √d_in in normalised space, so that
    # a realistic mix of latents fires (pure noise far from b_dec would fire almost none).
    xn = torch.randn(n, d.cfg.d_in, generator=g) + d.state_dict()["b_dec"].float().cpu()
    x = xn / s
    ref = d(x.to(dev)).x_hat.float().cpu()
    got = saelens_forward(cfg, tensors, x)
    return float((got - ref).abs().max()), float(ref.abs().max()) if math.isfinite(float(ref.abs().max())) else 0.0


# --- transcoders -------------------------------------------------------------------------------------
# SAELens transcoders (cfg.json + sae_weights.safetensors, architectures `transcoder`,
# `skip_transcoder`, `jumprelu_transcoder`; SAELens `saes/transcoder.py`):
# 
#     W_enc (d_in, d_sae)  b_enc (d_sae,)  W_dec (d_sae, d_out)  b_dec (d_out,)  [W_skip (d_out, d_in)]  [threshold (d_sae,)]
#     pre = x @ W_enc + b_enc                     (no input bias)
#     f   = ReLU(pre)   or   ReLU(pre)·[pre > threshold] (jumprelu_transcoder)
#     ŷ   = f @ W_dec + b_dec  [+ x @ W_skipᵀ]
# 
# cfg.json adds d_out, hook_name_out, hook_layer_out, hook_head_index_out to an SAE's fields;
# metadata.hook_name is the input hook.  saekit's `transcoder`/`skip-transcoder` export as the
# relu architectures, jumprelu and batchtopk (its inference rule is a JumpReLU) as
# `jumprelu_transcoder` (no skip: SAELens has no JumpReLU skip transcoder); TopK has no SAELens
# transcoder architecture and is refused.  The input scales and saekit's input bias are folded
# into the weights: W_enc·s_in, b_enc − b_in W_enc, W_dec/s_out, b_dec/s_out, W_skip·s_in/s_out.

SAELENS_ARCHS = {"transcoder": ("transcoder", "relu"), "skip_transcoder": ("skip-transcoder", "relu"),
                 "jumprelu_transcoder": ("transcoder", "jumprelu")}
"""SAELens transcoder architecture → (saekit kind, activation)."""


def is_saelens_transcoder(raw: dict) -> bool:
    arch = raw.get("architecture")
    return isinstance(arch, str) and arch in SAELENS_ARCHS


def load_saelens_transcoder(folder: Path, raw: dict, tensors_file: Path, device: str | torch.device = "cpu") -> Dictionary:
    """A SAELens transcoder folder as a saekit transcoder / skip-transcoder reproducing SAELens's formula."""

    where = str(folder / "cfg.json")
    schema.check(raw, {"d_in": schema.Int(min=1), "d_sae": schema.Int(min=1), "d_out": schema.Int(min=1),
                       "hook_name_out": schema.Str(required=False, null=True), "metadata": schema.Field("dict", required=False, null=True)},
                 where)

    meta_raw = raw.get("metadata") or {}
    schema.check(meta_raw, META_SCHEMA | {"hook_name_out": schema.Str(required=False, null=True)}, where, prefix="metadata.")
    extra = meta_raw.get("saekit") or {}
    schema.check(extra, SAEKIT_EXTRA | {"activation": schema.Str(required=False, null=True)}, where, prefix="metadata.saekit.")
    schema.check(extra.get("provenance") or {}, schema.PROVENANCE, where, prefix="metadata.saekit.provenance.")
    for key in ("apply_b_dec_to_input",):
        if key in raw and not isinstance(raw[key], bool):
            raise SaekitError(f"{where}: field {key} is {json.dumps(raw[key])[:40]}, expected true or false; the file is damaged")
    arch = raw["architecture"]
    kind, act = SAELENS_ARCHS[arch]
    d_in, d_sae, d_out = raw["d_in"], raw["d_sae"], raw["d_out"]
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if kind == "skip-transcoder":
        want["W_skip"] = (d_out, d_in)
    if act == "jumprelu":
        want["threshold"] = (d_sae,)
    schema.check_tensors(tensors_file, want, config=f"cfg.json (d_in={d_in}, d_sae={d_sae}, d_out={d_out})")
    t = _read_tensors(tensors_file)
    meta = raw.get("metadata") or {}
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise SaekitError(f"{where}: normalize_activations={raw.get('normalize_activations')!r} on a transcoder is not supported; "
                          "use SAELens for it")
    state = {"W_enc": t["W_enc"], "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if "W_skip" in t:
        state["W_skip"] = t["W_skip"].t()
    if act == "jumprelu":
        state["threshold"] = t["threshold"]
    text = lambda v: v if isinstance(v, str) and v else None  # noqa: E731  (a hostile cfg may put anything there)
    hook_in = text(meta.get("hook_name", raw.get("hook_name")))
    hook_out = text(raw.get("hook_name_out")) or text(meta.get("hook_name_out"))
    saekit_meta = meta.get("saekit") if isinstance(meta.get("saekit"), dict) else {}
    restored = saekit_meta.get("provenance") if isinstance(saekit_meta.get("provenance"), dict) else {}
    model = restored.get("model") if isinstance(restored.get("model"), dict) else (
        {"name": meta["model_name"], "compat": False} if text(meta.get("model_name")) else None)
    prov = Provenance(hook=hook_in, in_hooks=[hook_in] if hook_in else [], out_hooks=[hook_out] if hook_out else [], model=model)
    d = coder_from_tensors(kind, act, d_in, d_out, d_sae, prov, state)
    d.summary = dict(saekit_meta["summary"]) if isinstance(saekit_meta.get("summary"), dict) else {}
    d.summary["source"] = {"format": "saelens", "path": str(folder), "architecture": arch, "notes": []}
    return d.to(device).eval()


def saelens_transcoder_tensors(d: Dictionary) -> tuple[dict, dict[str, Tensor]]:
    """SAELens's cfg.json dict and tensors for a saekit transcoder / skip-transcoder (scales and input bias folded in)."""
    kind, act = d.cfg.kind, d.cfg.activation
    if kind not in ("transcoder", "skip-transcoder"):
        raise SaekitError(f"a {kind} has no SAELens layout (SAELens reads transcoders and skip transcoders); share the saekit folder"
                          + (", or export it with format circuit-tracer" if kind == "clt" else ""))
    if act == "topk":
        raise SaekitError("SAELens has no TopK transcoder architecture; train with --activation batchtopk (exported as "
                          "jumprelu_transcoder), jumprelu or relu, or share the saekit folder")
    if kind == "skip-transcoder" and act != "relu":
        raise SaekitError(f"SAELens's skip transcoder is ReLU only; a {act} skip-transcoder cannot be exported (share the saekit folder)")
    sd = {name: v.detach().float().cpu() for name, v in d.state_dict().items()}
    s_in, s_out = float(d.in_scale[0]), float(d.out_scale[0])
    tensors = {"W_enc": sd["W_enc"] * s_in, "b_enc": sd["b_enc"] - sd["b_in"] @ sd["W_enc"],
               "W_dec": sd["W_dec"] / s_out, "b_dec": sd["b_dec"] / s_out}
    if kind == "skip-transcoder":
        tensors["W_skip"] = (sd["W_skip"] * (s_in / s_out)).t().contiguous()  # (d_out, d_in)
        arch = "skip_transcoder"
    else:
        arch = "transcoder" if act == "relu" else "jumprelu_transcoder"
    if act == "jumprelu":
        tensors["threshold"] = sd["threshold"].clone()
    elif act == "batchtopk":  # ReLU(pre)·[pre > max(θ, 0)]: a JumpReLU with θ on every latent
        tensors["threshold"] = sd["threshold"][0].clamp_min(0).expand(d.cfg.d_dict).clone()

    prov = d.prov
    model = prov.model or {}
    layer = re.match(r"blocks\.(\d+)\.", d.out_hooks[0] or "")
    cfg = {
        "architecture": arch, "d_in": d.cfg.d_in, "d_sae": d.cfg.d_dict, "d_out": d.cfg.d_out, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "hook_name_out": d.out_hooks[0], "hook_layer_out": int(layer.group(1)) if layer else 0, "hook_head_index_out": None,
        "metadata": {
            "sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": FORMAT_VERSION, "model_name": model.get("name"),
            "hook_name": d.in_hooks[0], "hook_head_index": None,
            "model_from_pretrained_kwargs": {} if model.get("compat") else dict(NO_PROCESSING), "prepend_bos": True,
            "saekit": {"kind": kind, "activation": act, "k": d.cfg.k, "provenance": dataclasses.asdict(prov), "summary": d.summary},
        },
    }
    return cfg, tensors


def saelens_transcoder_forward(cfg: dict, t: dict[str, Tensor], x: Tensor) -> Tensor:
    """SAELens's transcoder prediction ŷ (n, d_out) of x (n, d_in), for checking exports."""
    pre = x @ t["W_enc"] + t["b_enc"]
    f = pre.relu()
    if cfg["architecture"] == "jumprelu_transcoder":
        f = f * (pre > t["threshold"]).to(pre.dtype)
    y = f @ t["W_dec"] + t["b_dec"]
    return y + x @ t["W_skip"].T if "W_skip" in t else y
