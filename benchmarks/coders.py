"""Transcoder vs SAE vs skip transcoder at equal L0; a CLT vs per-layer transcoders at equal total L0.

    python benchmarks/coders.py --store runs/mlp-store --layer 1 --k 8 --tokens 300000

The store must hold every layer's MLP input and output (`saekit harvest --model toy --hooks
blocks.0.mlp.hook_in,blocks.0.hook_mlp_out,blocks.1.mlp.hook_in,blocks.1.hook_mlp_out ...`).
All runs train on the same rows, in the same process, at the same token budget and latent
count, and are scored on the store's eval split:

1. layer --layer's MLP output at L0 = k:
   - a TopK SAE on the MLP output itself (it sees its target: a bound, not a replacement),
   - a TopK transcoder from the MLP input,
   - a TopK skip transcoder (the same + a learnt linear map);
   FVU of the MLP output, each as a ratio to the transcoder's.
2. every MLP output: a CLT with k latents per layer vs one transcoder per layer (k each),
   equal total latents and L0; FVU per layer and over all outputs, as CLT / per-layer ratios.

Each is then spliced into the model by `saekit.splice.splice_eval` on the store's eval split
(--splice-tokens tokens, inputs running): loss recovered against mean ablation of the replaced
hooks and the KL; for part 2 the per-layer transcoders are spliced all at once (the "all" row)
beside the CLT, so both replace every MLP output.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from saekit.interop import load
from saekit.splice import SpliceConfig, splice_eval
from saekit.store import open_store
from saekit.config import from_flags
from saekit.train import MLP_IN, MLP_OUT, TrainConfig, train


def _by_layer(hooks: list[str], patterns: tuple[str, ...]) -> dict[int, str]:
    out: dict[int, str] = {}
    for pat in patterns:
        for h in hooks:
            m = re.fullmatch(pat, h)
            if m:
                out.setdefault(int(m.group(1)), h)
    return dict(sorted(out.items()))


def run(store: str, layer: int, k: int, tokens: int, expansion: int, seed: int, device: str, splice_tokens: int = 16384) -> dict:
    hooks = list(open_store(store).hooks)
    ins, outs = _by_layer(hooks, MLP_IN), _by_layer(hooks, MLP_OUT)
    layers = sorted(set(ins) & set(outs))
    if layer not in layers:
        raise SystemExit(f"layer {layer}: the store needs its MLP input and output (has layers {layers})")
    width = open_store(store).hook_width(ins[layer])
    common = dict(store=store, k=[k], tokens=tokens, seed=seed, device=device, d_dict=expansion * width)
    res: dict = {"store": store, "layer": layer, "k": k, "tokens": tokens, "d_dict_per_layer": expansion * width}
    with tempfile.TemporaryDirectory() as tmp:
        def fit(name, **kw) -> list[dict]:
            paths = train(from_flags(TrainConfig, out=str(Path(tmp) / name), **(common | kw)), progress=False)
            folders[name] = [str(p) for p in paths]
            return [load(p).summary for p in paths]

        def spliced(name) -> dict:
            """splice-eval of the run's dictionaries together: the row of one dictionary, or the "all" row of several."""
            r = splice_eval(SpliceConfig(dicts=folders[name], store=store, max_tokens=splice_tokens, device=device))
            row = r["dictionaries"][0] if len(folders[name]) == 1 else r["all"]
            return {"loss_recovered_mean": row["loss_recovered_mean"], "loss_recovered_zero": row["loss_recovered_zero"],
                    "kl": row["kl"], "delta_ce": row["delta_ce"]}

        folders: dict[str, list[str]] = {}

        sae = fit("sae", kind="topk", hooks=[outs[layer]])[0]
        tc = fit("tc", kind="transcoder", hooks=[ins[layer]], target=[outs[layer]])[0]
        skip = fit("skip", kind="skip-transcoder", hooks=[ins[layer]], target=[outs[layer]])[0]
        res["one_layer"] = {name: {"fvu": s["fvu"], "l0": s["l0"], "fvu_vs_transcoder": s["fvu"] / tc["fvu"], **spliced(run)}
                            for name, run, s in (("sae_on_output", "sae", sae), ("transcoder", "tc", tc), ("skip_transcoder", "skip", skip))}
        per = fit("per-layer", kind="transcoder", hooks=[ins[l] for l in layers], target=[outs[l] for l in layers])
        clt = fit("clt", kind="clt", hooks=[ins[l] for l in layers], target=[outs[l] for l in layers],
                  d_dict=expansion * width * len(layers))[0]
        per_fvu = {list(s["fvu_per_hook"])[0]: s["fvu_per_hook"][list(s["fvu_per_hook"])[0]] for s in per}
        res["all_layers"] = {
            "per_layer_fvu": {h: {"clt": clt["fvu_per_hook"][h], "per_layer_transcoders": per_fvu[h],
                                  "clt_vs_per_layer": clt["fvu_per_hook"][h] / per_fvu[h]} for h in per_fvu},
            "total_l0": {"clt": clt["l0"], "per_layer_transcoders": sum(s["l0"] for s in per)},
            "spliced": {"clt": spliced("clt"), "per_layer_transcoders": spliced("per-layer")},
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--splice-tokens", type=int, default=16384, help="eval-split tokens for splice-eval's loss recovered")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    res = run(a.store, a.layer, a.k, a.tokens, a.expansion, a.seed, a.device, a.splice_tokens)
    print(f"layer {a.layer}, k {a.k}, {a.tokens:,} tokens, {res['d_dict_per_layer']} latents per layer")
    for name, r in res["one_layer"].items():
        print(f"  {name:16s} FVU {r['fvu']:.4f}  L0 {r['l0']:.1f}  FVU / transcoder's {r['fvu_vs_transcoder']:.3f}  "
              f"loss recovered (mean abl.) {r['loss_recovered_mean']:.4f}  KL {r['kl']:.4f}")
    for h, r in res["all_layers"]["per_layer_fvu"].items():
        print(f"  {h:24s} CLT FVU {r['clt']:.4f}  per-layer transcoder {r['per_layer_transcoders']:.4f}  ratio {r['clt_vs_per_layer']:.3f}")
    t = res["all_layers"]["total_l0"]
    print(f"  total L0: CLT {t['clt']:.1f}, per-layer transcoders {t['per_layer_transcoders']:.1f}")
    sp = res["all_layers"]["spliced"]
    print(f"  every MLP output replaced: loss recovered (mean abl.) CLT {sp['clt']['loss_recovered_mean']:.4f}, "
          f"per-layer transcoders {sp['per_layer_transcoders']['loss_recovered_mean']:.4f}; "
          f"KL CLT {sp['clt']['kl']:.4f}, per-layer {sp['per_layer_transcoders']['kl']:.4f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
