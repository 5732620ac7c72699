"""Other tools' transcoder and CLT folders in and out (saekit's own layout needs nothing here: `load_saekit`).

SAELens transcoders (cfg.json + sae_weights.safetensors, architectures `transcoder`,
`skip_transcoder`, `jumprelu_transcoder`; SAELens `saes/transcoder.py`):

    W_enc (d_in, d_sae)  b_enc (d_sae,)  W_dec (d_sae, d_out)  b_dec (d_out,)  [W_skip (d_out, d_in)]  [threshold (d_sae,)]
    pre = x @ W_enc + b_enc                     (no input bias)
    f   = ReLU(pre)   or   ReLU(pre)·[pre > threshold] (jumprelu_transcoder)
    ŷ   = f @ W_dec + b_dec  [+ x @ W_skipᵀ]

cfg.json adds d_out, hook_name_out, hook_layer_out, hook_head_index_out to an SAE's fields;
metadata.hook_name is the input hook.  saekit's `transcoder`/`skip-transcoder` export as the
relu architectures, jumprelu and batchtopk (its inference rule is a JumpReLU) as
`jumprelu_transcoder` (no skip: SAELens has no JumpReLU skip transcoder); TopK has no SAELens
transcoder architecture and is refused.  The input scales and saekit's input bias are folded
into the weights: W_enc·s_in, b_enc − b_in W_enc, W_dec/s_out, b_dec/s_out, W_skip·s_in/s_out.

sparsify transcoders (cfg.json `transcode: true` + sae.safetensors; `SparseCoder`):

    encoder.weight (n, d)  encoder.bias (n,)  W_dec (n, d)  b_dec (d,)  [W_skip (d, d)]
    f = TopK_k(ReLU(x @ encoder.weightᵀ + encoder.bias));  ŷ = f @ W_dec + b_dec [+ x @ W_skipᵀ]

(no b_dec subtraction when transcoding) = saekit's transcoder/skip-transcoder with the topk
activation.  The hookpoint `layers.L.mlp` reads the MLP's input and writes its output:
`blocks.L.mlp.hook_in` → `blocks.L.hook_mlp_out`.

circuit-tracer CLTs (`CrossLayerTranscoder.to_safetensors`: per layer i,
`W_enc_i.safetensors` with W_enc_i (d_tc, d_model), b_enc_i (d_tc,), b_dec_i (d_model,),
[threshold_i (d_tc,)] and `W_dec_i.safetensors` with W_dec_i (d_tc, n_layers − i, d_model)):

    f_i = ReLU(x_i W_enc_iᵀ + b_enc_i)   or, with thresholds, pre·[pre > threshold_i]
    ŷ_j = Σ_{i ≤ j} f_i W_dec_i[:, j − i] + b_dec_j

loads as saekit's `clt` (relu, or jumprelu where every threshold is ≥ 0, where the two
rules agree).  The folder names no hooks: circuit-tracer's default input is
`blocks.L.hook_resid_mid` (before the MLP's LayerNorm), output `blocks.L.hook_mlp_out`,
which the loaded dictionary records (a note says so); W_skip is not in these files.
`export_circuit_tracer` writes a saekit clt (relu, jumprelu, or batchtopk as thresholds) in
that layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from saekit import schema
from saekit.dictionaries import build
from saekit.dictionaries.base import DictConfig, Dictionary, Provenance
from saekit.errors import SaekitError
from saekit.runs import atomic, write_text

SAELENS_ARCHS = {"transcoder": ("transcoder", "relu"), "skip_transcoder": ("skip-transcoder", "relu"),
                 "jumprelu_transcoder": ("transcoder", "jumprelu")}
"""SAELens transcoder architecture → (saekit kind, activation)."""


def _coder(kind: str, act: str, d_in: int, d_out: int, d_dict: int, prov: Provenance, state: dict[str, Tensor], *,
           in_widths=None, out_widths=None, k=None) -> Dictionary:
    """A saekit coder with `state`'s tensors (b_in 0, scales 1 unless given, the rest of its state at defaults)."""
    cfg = DictConfig(kind=kind, d_in=d_in, d_out=d_out, d_dict=d_dict, k=k, activation=act,
                     in_widths=in_widths or [d_in], out_widths=out_widths or [d_out])
    d = build(cfg, prov)
    own = d.state_dict()
    full = {name: state[name].to(own[name].dtype).reshape(own[name].shape) if name in state else own[name] for name in own}
    d.load_state_dict(full)
    return d


# --- SAELens ----------------------------------------------------------------------------------------

def is_saelens_transcoder(raw: dict) -> bool:
    arch = raw.get("architecture")
    return isinstance(arch, str) and arch in SAELENS_ARCHS


def load_saelens_transcoder(folder: Path, raw: dict, tensors_file: Path, device: str | torch.device = "cpu") -> Dictionary:
    """A SAELens transcoder folder as a saekit transcoder / skip-transcoder reproducing SAELens's formula."""
    from saekit.interop.saelens import _read_tensors

    where = str(folder / "cfg.json")
    schema.check(raw, {"d_in": schema.Int(min=1), "d_sae": schema.Int(min=1), "d_out": schema.Int(min=1),
                       "hook_name_out": schema.Str(required=False, null=True), "metadata": schema.Field("dict", required=False, null=True)},
                 where)
    from saekit.interop.saelens import META_SCHEMA, SAEKIT_EXTRA

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
    d = _coder(kind, act, d_in, d_out, d_sae, prov, state)
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
    from saekit.interop.saelens import FORMAT_VERSION, NO_PROCESSING

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


# --- sparsify -----------------------------------------------------------------------------------------

def load_sparsify_transcoder(folder: Path, raw: dict, device: str | torch.device = "cpu") -> Dictionary:
    """A sparsify transcoder folder (`transcode: true`, W_skip if `skip_connection`) as a saekit (skip-)transcoder."""
    from saekit.interop.saelens import _read_tensors
    from saekit.interop.sparsify import _LAYER, WEIGHTS_FILE

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
    out = _coder("skip-transcoder" if skip else "transcoder", "topk", d, d, n, prov, state, k=k)
    out.summary = {"source": {"format": "sparsify", "path": str(folder), "hookpoint": hookpoint, "notes": notes}}
    return out.to(device).eval()


# --- circuit-tracer CLTs -------------------------------------------------------------------------------

CIRCUIT_TRACER_FILES = ("W_enc_0.safetensors", "W_dec_0.safetensors")


def load_circuit_tracer(path: str | os.PathLike, device: str | torch.device = "cpu",
                        input_hook: str = "hook_resid_mid", output_hook: str = "hook_mlp_out") -> Dictionary:
    """A circuit-tracer CLT folder (W_enc_i / W_dec_i safetensors per layer) as a saekit `clt`."""
    from safetensors import safe_open

    from saekit.interop.saelens import _read_tensors

    folder = Path(path)
    L = 0
    while (folder / f"W_enc_{L}.safetensors").is_file():
        L += 1
    missing = [f"W_dec_{i}.safetensors" for i in range(L) if not (folder / f"W_dec_{i}.safetensors").is_file()]
    if L == 0 or missing:
        raise SaekitError(f"{folder}: a circuit-tracer CLT needs W_enc_i and W_dec_i .safetensors for every layer; "
                          f"missing {', '.join(missing) or 'W_enc_0.safetensors'}")
    with safe_open(str(folder / "W_enc_0.safetensors"), framework="pt") as f:
        d_tc, d_model = f.get_slice("W_enc_0").get_shape()
        thresholds = "threshold_0" in f.keys()
    W_enc, b_enc, b_dec, theta, W_dec = [], [], [], [], torch.zeros(L * d_tc, L * d_model)
    for i in range(L):
        enc = {"W_enc_" + str(i): (d_tc, d_model), f"b_enc_{i}": (d_tc,), f"b_dec_{i}": (d_model,)} | (
            {f"threshold_{i}": (d_tc,)} if thresholds else {})
        schema.check_tensors(folder / f"W_enc_{i}.safetensors", enc, config=f"layer 0's W_enc_0 ({d_tc} features, d_model {d_model})")
        schema.check_tensors(folder / f"W_dec_{i}.safetensors", {f"W_dec_{i}": (d_tc, L - i, d_model)},
                             config=f"{L} layers of {d_tc} features")
        t = _read_tensors(folder / f"W_enc_{i}.safetensors")
        W_enc.append(t[f"W_enc_{i}"])
        b_enc.append(t[f"b_enc_{i}"])
        b_dec.append(t[f"b_dec_{i}"])
        if thresholds:
            theta.append(t[f"threshold_{i}"])
        W_dec[i * d_tc:(i + 1) * d_tc, i * d_model:] = _read_tensors(folder / f"W_dec_{i}.safetensors")[f"W_dec_{i}"].reshape(d_tc, -1)
    enc = torch.zeros(L * d_model, L * d_tc)
    for i, w in enumerate(W_enc):
        enc[i * d_model:(i + 1) * d_model, i * d_tc:(i + 1) * d_tc] = w.t()
    state = {"W_enc": enc, "b_enc": torch.cat(b_enc), "W_dec": W_dec, "b_dec": torch.cat(b_dec)}
    act = "relu"
    if thresholds:
        th = torch.cat(theta)
        if bool((th < 0).any()):
            raise SaekitError(f"{folder}: some JumpReLU thresholds are negative; circuit-tracer then passes negative pre-activations, "
                              "which saekit's JumpReLU (ReLU first) does not; use circuit-tracer for it")
        state["threshold"] = th
        act = "jumprelu"
    ins = [f"blocks.{i}.{input_hook}" for i in range(L)]
    outs = [f"blocks.{i}.{output_hook}" for i in range(L)]
    note = (f"circuit-tracer folders name no hooks: inputs taken as blocks.L.{input_hook}, outputs as blocks.L.{output_hook} "
            "(circuit-tracer's defaults)")
    mine = folder / "saekit.json"  # written by export_circuit_tracer: the hooks it was trained on
    if mine.is_file():
        got = schema.check(schema.read_json(mine, "circuit-tracer folder"), {"in_hooks": schema.Field("list", required=False),
                                                                           "out_hooks": schema.Field("list", required=False)}, str(mine))
        if len(got.get("in_hooks") or []) == L and len(got.get("out_hooks") or []) == L:
            ins, outs, note = [str(h) for h in got["in_hooks"]], [str(h) for h in got["out_hooks"]], f"hooks from {mine.name}"
    prov = Provenance(hook=ins[0], in_hooks=ins, out_hooks=outs)
    d = _coder("clt", act, L * d_model, L * d_model, L * d_tc, prov, state, in_widths=[d_model] * L, out_widths=[d_model] * L)
    d.summary = {"source": {"format": "circuit-tracer", "path": str(folder), "notes": [note]}}
    return d.to(device).eval()


def export_circuit_tracer(d: Dictionary, out: str | os.PathLike) -> Path:
    """Write a saekit clt in circuit-tracer's per-layer layout (relu; jumprelu; batchtopk as per-layer thresholds).

    The input scales and input bias are folded into W_enc and b_enc, the output scales into W_dec and b_dec.
    """
    if d.cfg.kind != "clt":
        raise SaekitError(f"the circuit-tracer layout holds CLTs; a {d.cfg.kind} exports with format saelens")
    if d.cfg.activation == "topk":
        raise SaekitError("circuit-tracer CLTs use ReLU or JumpReLU; a TopK clt cannot be exported (train it with --activation "
                          "batchtopk, jumprelu or relu)")
    widths = set(d.cfg.in_widths) | set(d.cfg.out_widths)
    if len(widths) != 1:
        raise SaekitError(f"circuit-tracer CLTs have one width for every layer's input and output; this clt has {sorted(widths)}")
    L, dm = len(d.cfg.in_widths), widths.pop()
    m = d.cfg.d_dict // L
    sd = {name: v.detach().float().cpu() for name, v in d.state_dict().items()}
    W_enc = d.encoder.detach().float().cpu() * d.in_scale.cpu()[:, None]
    b_enc = sd["b_enc"] - sd["b_in"] @ d.encoder.detach().float().cpu()
    W_dec = d.W_dec.detach().float().cpu() / d.out_scale.cpu()
    b_dec = sd["b_dec"] / d.out_scale.cpu()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(L):
        rows = slice(i * m, (i + 1) * m)
        enc = {f"W_enc_{i}": W_enc[i * dm:(i + 1) * dm, rows].t().contiguous(), f"b_enc_{i}": b_enc[rows].contiguous(),
               f"b_dec_{i}": b_dec[i * dm:(i + 1) * dm].contiguous()}
        if d.cfg.activation == "jumprelu":
            enc[f"threshold_{i}"] = sd["threshold"][rows].contiguous()
        elif d.cfg.activation == "batchtopk":
            enc[f"threshold_{i}"] = sd["threshold"][i].clamp_min(0).expand(m).contiguous()
        with atomic(folder / f"W_enc_{i}.safetensors") as tmp:
            save_file(enc, str(tmp))
        with atomic(folder / f"W_dec_{i}.safetensors") as tmp:
            save_file({f"W_dec_{i}": W_dec[rows, i * dm:].reshape(m, L - i, dm).contiguous()}, str(tmp))
    write_text(folder / "saekit.json", json.dumps({"note": "a saekit clt in circuit-tracer's layout", "in_hooks": d.in_hooks,
                                                  "out_hooks": d.out_hooks, "activation": d.cfg.activation}, indent=2))
    return folder
