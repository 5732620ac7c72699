"""What checking user files costs (issue 21), as ratios against the same work unchecked, in one run.

1. One training-style pass over a store (`ActivationStore.batches` until every train row
   was served once) with each shard's sha256 + shape check on first open, against the
   same pass with the shards already verified in this process.
2. Loading a saekit dictionary with its config schema and safetensors header checked
   (`saekit.load`), against building it and `load_file` + `load_state_dict` unchecked.

    python benchmarks/validation_cost.py [--mib 64] [--width 512] [--d-dict 16384] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_store(path: Path, mib: int, width: int, ctx: int = 64, shards: int = 4) -> Path:
    from saekit.models import HookSpec
    from saekit.store import StoreWriter

    rows = mib * (1 << 20) // (width * 2)
    n_seq = rows // ctx
    header = {"model": {"name": "synthetic", "fingerprint": "0", "d_model": width, "n_layers": 1, "n_ctx": ctx, "d_vocab": 100},
              "bos_id": 0, "rows": {"exclude_bos": True}, "holdout": {"fraction": 0.0}}
    w = StoreWriter(path, header=header, hooks=[HookSpec("blocks.0.hook_resid_post", 0, [width])], context_size=ctx,
                    dtype="float16", shard_seqs=-(-n_seq // shards), background=False)
    g = torch.Generator().manual_seed(0)
    for start in range(0, n_seq, 64):
        n = min(64, n_seq - start)
        w.write(np.ones((n, ctx), np.int32), {"blocks.0.hook_resid_post": torch.randn(n, ctx, width, generator=g)})
    w.close()
    return path


def one_pass(path: Path, verified: bool, batch_size: int = 4096) -> float:
    import saekit.store.format as fmt
    from saekit.store import ActivationStore

    if not verified:
        fmt._VERIFIED.clear()
    st = ActivationStore(path)
    steps = st.n_rows // batch_size
    t = time.perf_counter()
    it = st.batches(["blocks.0.hook_resid_post"], batch_size, split="all")
    for _ in range(steps):
        next(it)
    dt = time.perf_counter() - t
    st.close()
    return dt


def dictionary_loads(folder: Path) -> tuple[float, float]:
    import json

    from safetensors.torch import load_file

    import saekit
    from saekit.dictionaries import DictConfig, Provenance, build

    t = time.perf_counter()
    saekit.load(folder)
    checked = time.perf_counter() - t
    t = time.perf_counter()
    raw = json.loads((folder / "config.json").read_text())
    d = build(DictConfig(**raw["arch"]), Provenance(**raw["provenance"]))
    d.load_state_dict(load_file(str(folder / "weights.safetensors")))
    return checked, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="store size in MiB")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--d-dict", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    from saekit.dictionaries import DictConfig, Provenance, build

    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store", a.mib, a.width)
        one_pass(store, verified=False)  # warm the page cache: both arms then read from memory
        runs = [(one_pass(store, verified=True), one_pass(store, verified=False)) for _ in range(a.repeats)]  # interleaved
        plain, checked = min(r[0] for r in runs), min(r[1] for r in runs)
        print(f"store pass, {a.mib} MiB, width {a.width}: unchecked {plain:.3f} s, checksums + shapes on first open {checked:.3f} s "
              f"-> ratio {checked / plain:.2f}x")

        d = build(DictConfig(kind="topk", d_in=a.width, d_dict=a.d_dict, k=32), Provenance(hook="blocks.0.hook_resid_post"))
        folder = d.save(Path(tmp) / "dict")
        times = [dictionary_loads(folder) for _ in range(a.repeats)]
        c, u = min(t[0] for t in times), min(t[1] for t in times)
        print(f"dictionary load, d_in {a.width} x d_dict {a.d_dict}: unchecked {u:.3f} s, schema + header checked {c:.3f} s "
              f"-> ratio {c / u:.2f}x")


if __name__ == "__main__":
    main()
