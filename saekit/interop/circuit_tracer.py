"""circuit-tracer CLTs (`CrossLayerTranscoder.to_safetensors`: per layer i,
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

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from saekit import schema
from saekit.dictionaries.base import Dictionary, Provenance
from saekit.dictionaries.coders import coder_from_tensors
from saekit.errors import SaekitError
from saekit.interop.saelens import _read_tensors
from saekit.runs import atomic, write_text

CIRCUIT_TRACER_FILES = ("W_enc_0.safetensors", "W_dec_0.safetensors")


def load_circuit_tracer(path: str | os.PathLike, device: str | torch.device = "cpu",
                        input_hook: str = "hook_resid_mid", output_hook: str = "hook_mlp_out") -> Dictionary:
    """A circuit-tracer CLT folder (W_enc_i / W_dec_i safetensors per layer) as a saekit `clt`."""
    from safetensors import safe_open


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
    d = coder_from_tensors("clt", act, L * d_model, L * d_model, L * d_tc, prov, state, in_widths=[d_model] * L, out_widths=[d_model] * L)
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
