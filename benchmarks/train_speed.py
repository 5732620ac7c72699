"""Training throughput of every dictionary kind against the machine's fp32 matmul rate.

    python benchmarks/train_speed.py                 # d_in=256, d_dict=4096, batch 4096, CPU
    python benchmarks/train_speed.py --device cuda --steps 50

Reports, all measured in the same run:
1. the fp32 matmul rate R (FLOP/s) of a (batch, d_in)·(d_in, d_dict) product, best of a few;
2. tokens/s of the training loop (`Trainer.loop`: forward, loss, backward, Adam, decoder
   projection, dead-latent counters) per kind on a tensor in memory, as a fraction of the
   FLOP limit R / (10·d_in·d_dict) tokens/s (a dense SAE step: encoder and decoder
   forward, both weight gradients and the code gradient, 2·d_in·d_dict FLOPs each).  For
   topk the executed count is smaller when the decoder is sparse (SAEKIT_DECODE=bag, the
   default: 4·d_in·d_dict + 6·(k + k_aux)·d_in); both are printed.  A codebook executes one similarity
   product (2·d_in·d_dict / groups) plus a gather;
3. topk trained from an activation store on disk (float16, shuffling buffer) vs from the
   same rows in memory (target: within 10%);
4. a 4-way k sweep (one read of the store for 4 dictionaries) vs 4 single runs.

Each timing is the best of `--repeats`, which damps noise from other processes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saekit.dictionaries.base import Provenance
from saekit.dictionaries.fast import _BATCHTOPK, _DECODE
from saekit.train import HookSource, TrainConfig, Trainer, tensor_batches, train
from saekit.config import from_flags


def matmul_rate(n: int, d_in: int, d_dict: int, device: torch.device, repeats: int = 5) -> float:
    a = torch.randn(n, d_in, device=device)
    b = torch.randn(d_in, d_dict, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t) / 3)
    return 2 * n * d_in * d_dict / best


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def loop_tokens_per_s(cfg: TrainConfig, hooks: dict, source, repeats: int) -> float:
    """Best tokens/s of `Trainer.loop` (initialisation excluded) over `repeats` fresh trainers."""
    best = 0.0
    for _ in range(repeats):
        shutil.rmtree(cfg.out, ignore_errors=True)
        t = Trainer(cfg, hooks, source, progress=False)
        t._checkpoint = lambda: None  # the end-of-run checkpoint is amortised in real runs; not timed here
        t.prepare()
        # one warm-up step (allocations, Adam state), not timed
        t.n_steps = 1
        t.loop()
        t.n_steps = t.step + cfg.tokens // cfg.batch_size
        dev = t.device
        _sync(dev)
        t0 = time.perf_counter()
        t.loop()
        _sync(dev)
        best = max(best, (t.n_steps - 1) * cfg.batch_size / (time.perf_counter() - t0))
    return best


def write_store(path: Path, rows: int, d_in: int, ctx: int = 128) -> None:
    """A float16 store of random activations (one hook), written with saekit's own writer."""
    from saekit.models import HookSpec, ModelInfo
    from saekit.store import StoreWriter

    n_seq = -(-rows // (ctx - 1))
    header = {"model": ModelInfo("bench", "0" * 16, d_in, 1, ctx, 10).to_dict(), "bos_id": 0,
              "rows": {"exclude_bos": True, "pad_token": -1}, "config": {}, "config_hash": "bench",
              "holdout": {"fraction": 0.0}}
    w = StoreWriter(path, header=header, hooks=[HookSpec("h", 0, [d_in])], context_size=ctx, dtype="float16",
                    shard_seqs=max(1, 65536 // ctx))
    g = torch.Generator().manual_seed(0)
    for s in range(0, n_seq, 64):
        m = min(64, n_seq - s)
        w.write(np.ones((m, ctx), np.int32), {"h": torch.randn(m, ctx, d_in, generator=g)})
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--d-dict", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-store", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d_in, D, B = args.d_in, args.d_dict, args.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="saekit-bench-"))
    base = dict(d_dict=D, batch_size=B, tokens=args.steps * B, log_every=10**9, checkpoint_every=0,
                init_rows=B, device=args.device, out=str(tmp / "out"), dead_tokens=10**9)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    R = matmul_rate(B, d_in, D, dev)  # re-measured before each kind; the best is kept
    limit = R / (10 * d_in * D)
    print(f"device {dev}, torch threads {torch.get_num_threads()}, topk decode path: {_DECODE} (SAEKIT_DECODE), batchtopk: {_BATCHTOPK} (SAEKIT_BATCHTOPK)")
    print(f"fp32 matmul ({B}x{d_in})·({d_in}x{D}): {R / 1e9:.1f} GFLOP/s -> dense-SAE limit {limit:,.0f} tokens/s\n")

    rows = max(4 * B, 65536)
    x = torch.randn(rows, d_in)
    hooks = {"h": HookSource(d_in, Provenance(hook="h", scale=1.0))}
    src = tensor_batches({"h": x}, B)

    print(f"{'kind':<10} {'tokens/s':>10} {'dense-equiv':>12} {'executed':>10}")
    results = {}
    for kind, extra in [("relu", {"l1": [5.0]}), ("topk", {"k": [args.k]}), ("batchtopk", {"k": [args.k]}),
                        ("codebook", {"k": [8], "init_rows": D})]:
        cfg = from_flags(TrainConfig, kind=kind, **(base | extra))
        R = max(R, matmul_rate(B, d_in, D, dev))
        tps = loop_tokens_per_s(cfg, hooks, src, args.repeats)
        dense = 10 * d_in * D
        # dead_tokens=10**9 above: no latent is ever dead, so AuxK never runs and is not counted.
        if kind == "topk" and _DECODE == "bag":
            executed = 4 * d_in * D + 6 * args.k * d_in
        elif kind == "batchtopk" and _DECODE == "bag" and _BATCHTOPK == "candidates":
            # sparse decoder over the 4k candidates per token (fallback steps, if any, are dense)
            executed = 4 * d_in * D + 6 * 4 * args.k * d_in
        elif kind == "codebook":
            executed = 2 * d_in * D + 4 * 8 * d_in
        else:
            executed = dense
        results[kind] = tps
        print(f"{kind:<10} {tps:>10,.0f} {tps * dense / R:>11.1%} {tps * executed / R:>9.1%}")
    print(f"(fp32 matmul rate, best of all measurements: {R / 1e9:.1f} GFLOP/s; fractions use it)")

    if not args.skip_store:
        store = tmp / "store"
        write_store(store, rows, d_in)
        scfg = dict(base | {"kind": "topk", "k": [args.k], "store": str(store), "hooks": ["h"], "eval_tokens": 0,
                            "buffer_rows": 4 * B})
        from saekit.store import ActivationStore

        st = ActivationStore(store)
        store_hooks = {"h": HookSource(d_in, Provenance(hook="h", scale=float(st.stats("h")["scale"])))}

        def store_src(start):
            return st.batches(["h"], B, seed=0, buffer_rows=4 * B, start_batch=start)

        mem = loop_tokens_per_s(from_flags(TrainConfig, **scfg), store_hooks, src, args.repeats)
        disk = loop_tokens_per_s(from_flags(TrainConfig, **scfg), store_hooks, store_src, args.repeats)
        print(f"\ntopk from the store: {disk:,.0f} tokens/s vs in memory {mem:,.0f}: {disk / mem:.1%} (target ≥ 90%)")

        # whole `train()` calls (store opened, init, loop, save): 4 single runs vs one 4-way sweep
        ks = [args.k // 2, args.k, args.k * 2, args.k * 4]

        def timed(cfg):
            shutil.rmtree(cfg.out, ignore_errors=True)
            t = time.perf_counter()
            train(cfg, progress=False)
            return time.perf_counter() - t

        singles = sum(timed(from_flags(TrainConfig, **(scfg | {"k": [k], "out": str(tmp / f"s{k}")}))) for k in ks)
        sweep = timed(from_flags(TrainConfig, **(scfg | {"k": ks, "out": str(tmp / "sweep")})))
        print(f"4-way sweep k={ks}: {sweep:.1f} s vs 4 single runs {singles:.1f} s: {sweep / singles:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
