"""How fast the training loader reads a store, against the file system and h5py on the same files.

    .venv/bin/python benchmarks/loader_speed.py [--widths 256,2304] [--mb 160] [--batch 4096] [--workers 1,2] [--threads 1]

For each width it writes a synthetic float16 store (two hooks' worth of random rows, ctx 128, BOS
excluded as in a real harvest) to a temp folder, then measures in the same run, with the files in
the page cache (each path runs once untimed first):
  - raw: `np.fromfile` of every shard file (the file system's rate);
  - h5py: every activation dataset read chunk by chunk (`ds[a:a + chunk]`);
  - fill alone: the shuffle buffer's loads of one epoch (the part of `batches` that reads the
    files: each row copied from the mapped shard to its batch's place), to show where the time of a batch goes;
  - batches: `ActivationStore.batches` for one epoch of the train split (after one untimed epoch, so
    the steady state of a long run), with 1 and 2 workers, as float32 CPU tensors (the default) and
    in the stored float16 (`dtype=None`: the host-side work of the CUDA path with
    `gather_on_device=False`, which gathers into pinned memory and casts on the device).
    The consumer drops each batch, as the trainer does, so batch memory is recycled.
Rates are stored bytes of activations per CPU-second (process time, all threads) and per wall-second;
ratios are against h5py's chunk read per CPU-second.  Also printed: store bytes on disk per token per
hook against width × 2 bytes (the physical minimum), and the estimate for a 16-core host
(rows per CPU-second at the most workers measured, × 16).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from saekit.models import HookSpec, ModelInfo  # noqa: E402
from saekit.store import ActivationStore, StoreWriter  # noqa: E402

CTX = 128
HOOK = "blocks.0.hook_resid_post"


def make_store(path: Path, width: int, mb: float, seed: int = 0) -> None:
    """A float16 store of about `mb` MB of activations in 4 shards, one hook."""
    n_seq = max(8, int(mb * 2**20 / (CTX * width * 2)))
    shard_seqs = -(-n_seq // 4)
    header = {"model": ModelInfo("synthetic", "0" * 16, width, 1, CTX, 100).to_dict(), "bos_id": 0,
              "rows": {"exclude_bos": True, "pad_token": -1}, "config": {}, "config_hash": "bench", "holdout": {"fraction": 0.0}}
    w = StoreWriter(path, header=header, hooks=[HookSpec(HOOK, 0, [width])], context_size=CTX, dtype="float16",
                    shard_seqs=shard_seqs, background=False)
    rng = np.random.default_rng(seed)
    step = max(1, min(shard_seqs, (32 << 20) // (CTX * width * 4)))
    for s in range(0, n_seq, step):
        n = min(step, n_seq - s)
        tokens = rng.integers(1, 100, (n, CTX)).astype(np.int32)
        tokens[:, 0] = 0
        w.write(tokens, {HOOK: torch.from_numpy(rng.standard_normal((n, CTX, width), dtype=np.float32))})
    w.close()


def timed(fn) -> tuple[float, float, int]:
    """(cpu seconds, wall seconds, bytes) of fn() -> bytes."""
    c0, w0 = time.process_time(), time.perf_counter()
    n = fn()
    return time.process_time() - c0, time.perf_counter() - w0, n


def raw_read(path: Path) -> int:
    return sum(np.fromfile(f, dtype=np.uint8).size for f in sorted(path.glob("shard-*.h5")))


def h5py_read(path: Path) -> int:
    n = 0
    for f in sorted(path.glob("shard-*.h5")):
        with h5py.File(f, "r") as h:
            ds = h[f"acts/{HOOK}"]
            c = ds.chunks[0]
            for a in range(0, ds.shape[0], c):
                n += ds[a : a + c].nbytes
    return n


class Batches:
    """One stream over the store, read in epochs: the first (untimed) call pays the buffer's first touch, later
    calls measure the steady state a long training run sees."""

    def __init__(self, path: Path, batch: int, workers: int, stored: bool):
        self.store = ActivationStore(path)
        self.n_batches = self.store.n_rows // batch
        kw = {"workers": workers} if workers != 1 else {}
        if stored:
            kw["dtype"] = None
        self.it = self.store.batches(HOOK, batch, seed=0, buffer_rows=max(1 << 17, 4 * batch), **kw)

    def __call__(self) -> int:
        n = 0
        for _ in range(self.n_batches):
            n += next(self.it)[HOOK].numel() * 2  # stored bytes delivered (float16)
        return n

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if close:
            close()
        self.store.close()


class FillOnly:
    """Every fill of one epoch loaded into one buffer, as `batches` does before serving it (no gather, no cast)."""

    def __init__(self, path: Path, batch: int):
        self.store = ActivationStore(path)
        self.stream = self.store.batches(HOOK, batch, seed=0, buffer_rows=max(1 << 17, 4 * batch))
        self.buf = self.stream._new_buffer()

    def __call__(self) -> int:
        rows = sum(self.stream._load(0, fi, fill, self.buf, None) for fi, fill in enumerate(self.stream._fills(0)))
        return rows * self.stream._widths[HOOK] * 2

    def close(self) -> None:
        self.stream.close()
        self.store.close()


def label(workers: int, stored: bool) -> str:
    return f"batches {'f16' if stored else 'f32'}, {workers} thr"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="256,2304")
    ap.add_argument("--mb", type=float, default=160, help="MB of activations per store")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many timed runs per path")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one: the loader beside a training step)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    workers = [int(w) for w in a.workers.split(",")]
    print(f"torch threads {torch.get_num_threads()}; store {a.mb:.0f} MB float16 per width, ctx {CTX}, batch {a.batch}")
    tmp = Path(tempfile.mkdtemp(prefix="saekit-loader-"))
    try:
        for width in [int(w) for w in a.widths.split(",")]:
            path = tmp / f"w{width}"
            make_store(path, width, a.mb)
            store = ActivationStore(path)
            disk = sum(f.stat().st_size for f in path.glob("shard-*.h5"))
            per_tok = disk / store.n_tokens
            print(f"\nwidth {width}: {store.n_tokens:,} tokens, {disk / 2**20:.0f} MiB on disk; "
                  f"{per_tok:.1f} bytes per token per hook vs {width * 2} (width x 2): {per_tok / (width * 2):.3f}x the minimum")
            paths = {"raw np.fromfile": lambda: raw_read(path), "h5py chunk read": lambda: h5py_read(path)}
            streams = [FillOnly(path, a.batch)]
            paths["fill alone (1 thr)"] = streams[0]
            for stored in (False, True):
                for w in workers:
                    streams.append(Batches(path, a.batch, w, stored))
                    paths[label(w, stored)] = streams[-1]
            res = {}
            for name, fn in paths.items():
                fn()  # warm the page cache and any lazy imports
                runs = [timed(fn) for _ in range(a.repeats)]
                cpu = min(r[0] for r in runs)
                wall = min(r[1] for r in runs)
                res[name] = (runs[0][2] / cpu, runs[0][2] / wall)
            base = res["h5py chunk read"][0]
            print(f"{'path':<22} {'GB/CPU-s':>9} {'GB/wall-s':>10} {'Mrows/CPU-s':>12} {'vs h5py (CPU)':>14}")
            for name, (per_cpu, per_wall) in res.items():
                print(f"{name:<22} {per_cpu / 1e9:9.2f} {per_wall / 1e9:10.2f} {per_cpu / (width * 2) / 1e6:12.3f} {per_cpu / base:13.2f}x")
            for stored in (False, True):
                top = label(max(workers), stored)
                line = f"16-core estimate, {top}: {16 * res[top][0] / (width * 2):,.0f} rows/s (rows per CPU-second x 16)"
                if max(workers) > 1 and 1 in workers:
                    line += f"; wall-clock scaling {max(workers)} vs 1 worker: {res[top][1] / res[label(1, stored)][1]:.2f}x"
                print(line)
            for b in streams:
                b.close()
            store.close()
            shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
