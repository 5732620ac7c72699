"""Harvest throughput against a bare forward pass of the same model, printed as time ratios.

    python benchmarks/harvest_speed.py                      # a random 8-layer GPT-2 written to a temp dir
    python benchmarks/harvest_speed.py --model gpt2 --device cuda

For each case the whole `harvest()` call (tokenising, forward with hooks, float16
conversion, statistics, HDF5 writes, checksums) is timed against a plain forward of the
same loaded model (no hooks, all layers, logits computed) over the same token batches.
Ratio = harvest time / bare-forward time, so < 1.0× means harvesting was cheaper than
just running the model.  Cases alternate and the best of `--repeats` runs is kept, which
damps noise from other processes on a shared machine.  Targets (issue 3): 2 hooks at
float16 ≤ 1.15×; one early-layer hook < 1.0× (the forward stops after that layer).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saekit import text
from saekit.harvest import HarvestConfig, harvest
from saekit.models import load_model


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "the cat sat on a mat while 42 dogs ran far away and then came back home again".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(n_docs)) + "\n")
    return str(path)


def bare_forward_seconds(lm, batches: list[np.ndarray], device) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for toks in batches:
            inp = torch.from_numpy(np.where(toks == text.PAD, lm.bos_id, toks)).long().to(device)
            lm.bridge(inp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name/dir; default: a random GPT-2 (--layers, --width) written to a temp dir")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64 * 1024)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="saekit-bench-"))
    try:
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from conftest import write_tiny_gpt2

            model = write_tiny_gpt2(tmp / "model", n_layer=args.layers, n_embd=args.width, n_head=8, n_positions=max(256, args.context_size))
        if args.threads:  # after importing tests/conftest.py, which sets its own thread count
            torch.set_num_threads(args.threads)
        n_docs = max(50, args.tokens // 60)
        data = write_corpus(tmp / "corpus.txt", n_docs)
        lm = load_model(model, device=args.device)
        device = next(lm.bridge.parameters()).device
        L = lm.info.n_layers
        cases = {
            f"2 hooks float16 (blocks.{L // 2}.hook_resid_post, blocks.{L - 1}.hook_mlp_out)": [f"blocks.{L // 2}.hook_resid_post", f"blocks.{L - 1}.hook_mlp_out"],
            "1 early hook float16 (blocks.0.hook_resid_post)": ["blocks.0.hook_resid_post"],
        }
        cfg0 = HarvestConfig(model=model, hooks=["x"], data=data, context_size=args.context_size, tokens=args.tokens, batch_size=args.batch_size, device=args.device)
        eos = lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else lm.bos_id
        seqs = list(text.sequences(data, lm.tokenizer, args.context_size, bos_id=lm.bos_id, eos_id=eos))[: cfg0.max_sequences]
        n_tok = len(seqs) * args.context_size
        # The same batches harvest() forms (batch_size; shards are larger than a batch here).
        from saekit.harvest import _batches

        batches = [b for _, b in _batches(iter(seqs), 0, len(seqs), args.batch_size, cfg0.shard_seqs)]
        bare_forward_seconds(lm, batches[:2], device)  # warm-up
        best_bare = float("inf")
        best = {name: float("inf") for name in cases}
        for r in range(args.repeats):
            best_bare = min(best_bare, bare_forward_seconds(lm, batches, device))
            for name, hooks in cases.items():
                out = tmp / f"store-{r}"
                cfg = HarvestConfig(**{**cfg0.__dict__, "hooks": hooks, "out": str(out)})
                t = time.perf_counter()
                harvest(cfg, progress=False, model=lm)
                best[name] = min(best[name], time.perf_counter() - t)
                shutil.rmtree(out)
        print(f"model {model if args.model else f'random GPT-2 {L} layers, d_model {lm.info.d_model}'}; device {args.device}; "
              f"{len(seqs)} sequences × {args.context_size} = {n_tok:,} tokens; batch {args.batch_size}; torch threads {torch.get_num_threads()}")
        print(f"{'bare forward (no hooks, all layers)':<70} {n_tok / best_bare:>10,.0f} tok/s   1.00×")
        for name in cases:
            print(f"{'harvest: ' + name:<70} {n_tok / best[name]:>10,.0f} tok/s   {best[name] / best_bare:.2f}×")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
