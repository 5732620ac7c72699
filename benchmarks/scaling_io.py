"""The I/O figures behind docs/scaling.md: harvest MB/s written, store read rows/s, 1 vs 2 processes.

    /work/venv/bin/python benchmarks/scaling_io.py [--width 256] [--seqs 512] [--ctx 128]

Makes a random-weight GPT-2 of the given width (2 layers) and a word corpus in a temp
folder, then measures, on this machine:
  - harvest, one process and `torchrun --nproc-per-node 2`: tokens/s and MB/s written;
  - the training loader (`ActivationStore.batches`): rows/s and MB/s delivered, 1 and 2 hooks;
  - `saekit train` (topk) alone and under torchrun with 2 ranks: tokens/s from metrics.jsonl.
Times include process start-up for the torchrun runs (printed separately as `startup`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("shard-*.h5"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seqs", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()

    from conftest import write_tiny_gpt2

    tmp = Path(tempfile.mkdtemp(prefix="saekit-scaling-"))
    model = write_tiny_gpt2(tmp / "model", n_layer=2, n_embd=a.width, n_head=4, n_positions=a.ctx)
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "42", "7", "far", "away", "and", "then"]
    n_chars = a.seqs * a.ctx * 2
    lines, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "."
        lines.append(line)
        size += len(line) + 1
    (tmp / "corpus.txt").write_text("\n".join(lines) + "\n")
    text_bytes_per_token = 1.0  # the fixture tokenizer is character-level: one byte of text per token

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    hooks = "blocks.0.hook_resid_post,blocks.1.hook_resid_post"
    harvest = ["harvest", "--model", model, "--data", str(tmp / "corpus.txt"), "--hooks", hooks, "--context-size", str(a.ctx),
               "--tokens", str(a.seqs * a.ctx), "--shard-tokens", str(a.ctx * 64), "--batch-size", "16", "-q"]
    py = [sys.executable, "-m", "saekit"]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2"]
    startup = run([*py, "hooks", "--model", model], env)
    t1 = run([*py, *harvest, "--out", str(tmp / "s1")], env)
    t2 = run([*torchrun, "--master-port", str(free_port()), "-m", "saekit", *harvest, "--out", str(tmp / "s2")], env)
    tokens = a.seqs * a.ctx
    mb = store_bytes(tmp / "s1") / 1e6
    rows = {"width": a.width, "tokens": tokens, "store_MB": round(mb, 2),
            "bytes_per_token_per_hook": round(store_bytes(tmp / "s1") / tokens / 2, 1),
            "text_bytes_per_token": text_bytes_per_token, "startup_s": round(startup, 1)}
    for name, t in (("harvest_1proc", t1), ("harvest_2proc", t2)):
        rows[name] = {"s": round(t, 1), "tokens_per_s": round(tokens / t), "MB_per_s": round(mb / t, 2),
                      "excluding_startup_MB_per_s": round(mb / max(t - startup, 1e-9), 2)}

    from saekit.store import ActivationStore

    store = ActivationStore(tmp / "s1")
    for hs in (store.hooks[:1], store.hooks):
        it = store.batches(hs, 4096, buffer_rows=1 << 15)
        next(it)
        t0 = time.perf_counter()
        n = 0
        for _ in range(10):
            n += next(it)[hs[0]].shape[0]
        dt = time.perf_counter() - t0
        rows[f"loader_{len(hs)}hook"] = {"rows_per_s": round(n / dt), "MB_per_s_fp16_read": round(n * a.width * 2 * len(hs) / dt / 1e6, 1)}

    train = ["train", "--store", str(tmp / "s1"), "--hook", store.hooks[0], "--kind", "topk", "--k", "16",
             "--expansion", "8", "--batch-size", "1024", "--tokens", str(1024 * a.steps), "--log-every", str(a.steps),
             "--checkpoint-every", "0", "--eval-tokens", "0", "--device", "cpu"]
    for name, cmd in (("train_1proc", [*py, *train, "--out", str(tmp / "t1")]),
                      ("train_2proc", [*torchrun, "--master-port", str(free_port()), "-m", "saekit", *train, "--out", str(tmp / "t2")])):
        run(cmd, env)
        out = Path(cmd[cmd.index("--out") + 1])
        last = json.loads(next(out.rglob("metrics.jsonl")).read_text().splitlines()[-1])
        rows[name] = {"tokens_per_s": round(last["tokens_per_s"])}
    rows["cpu_count"] = os.cpu_count()
    rows["loadavg_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
