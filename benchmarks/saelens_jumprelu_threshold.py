"""Why SAELens's target-L0 JumpReLU stays far above its target here: its thresholds against Adam's reach.

    python benchmarks/saelens_jumprelu_threshold.py --peer-python $VENV/bin/python     # ~1 minute of one core

Trains SAELens's `jumprelu` (quadratic loss around target_l0 = k; peers/trainers.py) on the L0-5 plain
world's training rows with truth.py's settings, then prints its saved thresholds against the most Adam can
move a parameter in the run (init + steps × lr), and the threshold an L0 of k would need (the median per-row
k-th largest pre-activation).  Its sparsity loss reaches the thresholds only, so when they sit at Adam's
reach the run is too short for that loss, whatever its coefficient.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from saekit.store import ActivationStore
from saekit.synth import SynthConfig, synth
from saekit.train import default_lr

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from compare import DEFAULT_PEER_PYTHON, train_rows, write_acts  # noqa: E402
from truth import worlds  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--tokens", type=int, default=500_000)
    p.add_argument("--d-dict", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
    a = p.parse_args()
    torch.set_num_threads(1)
    lr = default_lr("jumprelu", a.d_dict)
    with tempfile.TemporaryDirectory(prefix="saekit-jumprelu-thr-") as tmp:
        work = Path(tmp)
        wa = argparse.Namespace(features=256, d=64, rows=400_000, l0=float(a.k), seed=0, device="cpu")
        synth(SynthConfig(out=str(work / "world"), **worlds(wa)["plain"]))
        st = ActivationStore(str(work / "world"))
        acts = write_acts(work, st, st.hooks[0], train_rows(st, st.hooks[0], a.tokens))
        meta = json.loads((work / "meta.json").read_text())
        (work / "meta.json").write_text(json.dumps(meta | {"hook": "blocks.0.hook_resid_post"}))
        subprocess.run([a.peer_python, str(Path(__file__).parent / "peers" / "trainers.py"), "--trainer", "saelens", "--kind", "jumprelu",
                        "--acts", str(acts), "--out", str(work / "out"), "--d-dict", str(a.d_dict), "--k", str(a.k), "--lr", repr(lr),
                        "--batch-size", str(a.batch_size), "--tokens", str(a.tokens), "--threads", "1"], check=True, capture_output=True)
        sd = load_file(str(work / "out" / "saelens" / "sae_weights.safetensors"))
        x = load_file(str(acts))["train"][:8192]
    pre = (x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"]
    thr = sd["threshold"]
    reach = 0.01 + math.ceil(a.tokens / a.batch_size) * lr  # SAELens's initial threshold + one lr per step
    print(f"thresholds as saved: mean {thr.mean():.3f}, median {thr.median():.3f}, max {thr.max():.3f}; Adam's reach {reach:.3f}")
    print(f"L0: {(pre > thr).float().sum(1).mean():.1f} at its thresholds, {(pre > 0).float().sum(1).mean():.1f} above 0 (target {a.k})")
    print(f"threshold L0 {a.k} would need (median per-row {a.k}-th largest pre-activation): "
          f"{pre.topk(a.k, dim=1).values[:, -1].median():.3f}")


if __name__ == "__main__":
    main()
