"""What splicing transcoders and CLTs costs (issue 19), as ratios against splicing an SAE, in one run.

On a GPT-2-shaped model with ReLU MLPs and random weights (`--layers` blocks, width `--d`),
`saekit.splice.evaluate` (clean pass, zero and mean ablation, the spliced pass; the timing a
user of `splice-eval` pays) of
  - an SAE (ReLU, 4·d latents) at the last block's hook_mlp_out: the baseline;
  - a transcoder (the last MLP's own weights) from blocks.{L-1}.mlp.hook_in, --input running and clean;
  - a CLT over every layer (4·d latents per layer), running and clean;
  - one transcoder per layer, spliced one by one and all at once, running and clean.
Each case is timed over the same tokens, best of `--repeats` taken round-robin, and printed as a ratio to the SAE's time.
The test-only dictionary classes of tests/test_replace.py stand in for the trained kinds.

    python benchmarks/splice_modes.py [--layers 4] [--d 64] [--seqs 32] [--ctx 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from conftest import write_tiny_gpt2
    from test_replace import exact_transcoder, random_clt
    from transformers import GPT2LMHeadModel

    from saekit.dictionaries import DictConfig, Provenance, build
    from saekit.models import load_model, resolve_hooks
    from saekit.splice import Target, evaluate, mean_activations, resolve_target

    tmp = Path(tempfile.mkdtemp())
    path = write_tiny_gpt2(tmp / "m", n_layer=a.layers, n_embd=a.d, n_head=4, n_positions=max(64, a.ctx))
    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (Path(path) / "config.json").write_text(json.dumps(cfg))
    model = load_model(path)
    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 41, (a.seqs, a.ctx), generator=g)
    tokens[:, 0] = 0
    last = a.layers - 1
    out_hooks = [f"blocks.{i}.hook_mlp_out" for i in range(a.layers)]
    means = mean_activations(model, tokens, out_hooks, batch_size=8)

    spec = resolve_hooks(model, [out_hooks[last]])[0]
    sae = build(DictConfig(kind="relu", d_in=a.d, d_dict=4 * a.d), Provenance(hook=spec.name, model=model.info.to_dict()))
    sae.reset_parameters(torch.Generator().manual_seed(1))
    cases = {
        "SAE at the last mlp_out (baseline)": ([Target("sae", sae, spec)], "running"),
        "transcoder, last layer, running": ([resolve_target("tc", exact_transcoder(model, hf, last), model)], "running"),
        "transcoder, last layer, clean": ([resolve_target("tc", exact_transcoder(model, hf, last), model)], "clean"),
        "CLT over all layers, running": ([resolve_target("clt", random_clt(model, m=4 * a.d), model)], "running"),
        "CLT over all layers, clean": ([resolve_target("clt", random_clt(model, m=4 * a.d), model)], "clean"),
    }
    per_layer = [resolve_target(f"tc{i}", exact_transcoder(model, hf, i), model) for i in range(a.layers)]
    cases["per-layer transcoders (each + all at once), running"] = (per_layer, "running")
    cases["per-layer transcoders (each + all at once), clean"] = (per_layer, "clean")

    times, rows = dict.fromkeys(cases, float("inf")), {}
    for _ in range(a.repeats):  # round-robin, so a busy moment on a shared machine hits every case alike
        for name, (targets, mode) in cases.items():
            t0 = time.perf_counter()
            res = evaluate(model, targets, tokens, means, batch_size=8, mode=mode)
            times[name] = min(times[name], time.perf_counter() - t0)
            rows[name] = res["all"]
    base = times["SAE at the last mlp_out (baseline)"]
    print(f"{a.layers} layers, d_model {a.d}, {a.seqs}×{a.ctx} tokens, {a.threads} thread(s), best of {a.repeats}")
    print(f"{'case':55s} {'seconds':>8s} {'× SAE':>7s} {'rec. zero':>10s} {'KL':>9s}")
    for name, t in times.items():
        r = rows[name]
        print(f"{name:55s} {t:8.3f} {t / base:7.2f} {r['loss_recovered_zero']:10.4f} {r['kl']:9.2e}")


if __name__ == "__main__":
    main()
