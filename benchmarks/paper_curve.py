"""Transition accuracy (and held-out loss) of the long run's snapshots, with every codebook active and without.

usage: python benchmarks/paper_curve.py RUN   (RUN: the folder of benchmarks/paper_run.sh; scores every RUN/snapshots/step-N
not yet in RUN/curve.jsonl and appends a line per step)
"""

import json
import sys
from pathlib import Path

import torch

from saekit import runs
from saekit.config import from_flags
from saekit.inmodel.codebooks import InModelCodebook, build_codebook, parse_spec
from saekit.inmodel.finetune import FinetuneConfig, _n_layers, with_preset
from saekit.inmodel.model import load_in_model, lm_score
from saekit.inmodel.sites import Splicer
from saekit.toy.fsm import generate, load_fsm, transition_accuracy
from saekit.toy.train import sample

torch.set_num_threads(1)
ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/paper")
cfg = with_preset(from_flags(FinetuneConfig, **json.loads((ROOT / "ft" / "config.json").read_text())))  # flat (old) or nested run
specs = parse_spec(cfg.codebooks, _n_layers(cfg.model))
hooks = [s.hook for s in specs]
im = load_in_model(cfg.model, hooks, torch.device("cpu"))
fsm = load_fsm(cfg.model)
splicer = Splicer(im.hf, list(im.sites.values()))
layers = {s.hook: InModelCodebook(build_codebook(s, im.shapes[s.hook], None, cfg.input_norm), cfg.objective) for s in specs}
ctx = im.hf.config.max_position_embeddings
eval_tokens, _ = generate(fsm, 64, ctx, seed=[0, 1])
done = set()
out = ROOT / "curve.jsonl"
if out.exists():
    done = {json.loads(l)["step"] for l in out.read_text().splitlines() if l}
folders = sorted((ROOT / "snapshots").glob("step-*"), key=lambda p: int(p.name[5:]))
for f in folders:
    tensors, meta = runs.read_checkpoint(f)
    step = int(meta["step"])
    if step in done:
        continue
    params = dict(im.hf.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("model."):
                params[k[6:]].copy_(v)
            elif k.startswith(("codebook.", "ln_weight.", "ln_bias.")):
                name, h = k.split(".", 1)
                getattr(layers[h].d, name).copy_(v)
    for layer in layers.values():
        layer.mask = None
    with splicer.active(dict(layers)):
        acc_cb, n_cb = transition_accuracy(fsm, sample(im.hf, 64, ctx, seed=0))
    acc, n = transition_accuracy(fsm, sample(im.hf, 64, ctx, seed=0))
    s_cb = lm_score(im.hf, eval_tokens, im.bos_id, 16, splicer, layers, cfg.skip_bos)
    s = lm_score(im.hf, eval_tokens, im.bos_id, 16)
    row = {"step": step, "transition_accuracy_codebooks": acc_cb, "transition_accuracy_no_codebooks": acc, "transitions": n_cb,
           "loss_codebooks": s_cb.loss, "loss_no_codebooks": s.loss}
    print(row, flush=True)
    with out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
