"""saekit's TopK transcoder against sparsify's, trained on the same rows: tokens/s and held-out FVU.

    python benchmarks/peers/transcoders.py [--store DIR --layer 1] --tokens 400000 --k 8 --threads 1

The store must hold the layer's MLP input (`blocks.L.mlp.hook_in`) and output
(`blocks.L.hook_mlp_out`); without --store the toy model's is harvested once into --work.
The train split's counted rows of both hooks (paired, in store order) go to one
acts.safetensors {train: input, target: output}; `trainers.py --kind transcoder` then trains
saekit's transcoder (its Trainer, in this venv) and sparsify's (`SparseCoder(transcode=True)`,
its Trainer's step body, in the peer venv of setup_peers.sh) with the same latents, k, batch
size, lr, tokens, seed, threads and batch order.  Both folders are loaded through saekit's
interop (sparsify's `transcode: true` layout) and scored by one FVU on the store's eval split.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import DEFAULT_PEER_PYTHON, peer_available, run_trainer, train_rows  # noqa: E402


def toy_mlp_store(work: Path, layer: int, n_seq: int, seed: int) -> Path:
    from saekit.harvest import HarvestConfig, harvest
    from saekit.toy.corpus import ToyDataConfig, write_corpus

    out = work / "toy-mlp-store"
    if (out / "manifest.json").exists():
        return out
    text = work / "toy.txt"
    write_corpus(ToyDataConfig(out=str(text), n_seq=n_seq, seed=seed, model="toy"))
    return harvest(HarvestConfig(model="toy", hooks=[f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out"],
                                 data=str(text), packing="doc", out=str(out), seed=seed), progress=False)


def heldout_fvu(folder: str, store, hook_in: str, hook_out: str) -> float:
    from saekit.interop import load
    from saekit.metrics import FVUAccumulator

    d = load(folder)
    acc = FVUAccumulator()
    with torch.no_grad():
        for _, tokens, acts in store.iter_sequences([hook_in, hook_out], "eval", 256):
            mask = torch.as_tensor(store.row_mask(tokens), dtype=torch.bool)
            x, y = (torch.as_tensor(acts[h])[mask].float() for h in (hook_in, hook_out))
            acc.update(y, d.predict({hook_in: x})[hook_out])
    return acc.value()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--n-seq", type=int, default=2000, help="toy store size when no --store is given")
    ap.add_argument("--tokens", type=int, default=400_000)
    ap.add_argument("--d-dict", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.0, help="0: saekit's automatic lr for the d_dict, given to both")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
    ap.add_argument("--work", default="")
    ap.add_argument("--json", default=str(HERE / "results-transcoders.json"))
    a = ap.parse_args()
    from saekit.store import open_store
    from saekit.train import default_lr

    work = Path(a.work or tempfile.mkdtemp(prefix="saekit-tc-"))
    work.mkdir(parents=True, exist_ok=True)
    store = open_store(a.store or str(toy_mlp_store(work, a.layer, a.n_seq, a.seed)))
    hook_in, hook_out = f"blocks.{a.layer}.mlp.hook_in", f"blocks.{a.layer}.hook_mlp_out"
    x, y = train_rows(store, hook_in, a.tokens), train_rows(store, hook_out, a.tokens)
    acts = work / "acts.safetensors"
    save_file({"train": x, "target": y}, str(acts))
    meta = {"hook": hook_in, "target_hook": hook_out, "model": store.model.to_dict(), "store": str(store.path),
            "hook_shape": list(store.hook_shape(hook_in)), "scale": float(store.stats(hook_in)["scale"]),
            "target_shape": list(store.hook_shape(hook_out)), "target_scale": float(store.stats(hook_out)["scale"])}
    (work / "meta.json").write_text(json.dumps(meta))
    lr = a.lr or default_lr("transcoder", a.d_dict)
    runs = {}
    for trainer, python in (("saekit", sys.executable), ("sparsify", a.peer_python)):
        why = None if trainer == "saekit" else peer_available(python, "sparsify")
        if why:
            print(f"sparsify: skipped ({why})")
            continue
        res = run_trainer(python, trainer, "transcoder", acts, work / trainer, a, a.d_dict, lr, l1=0.0)
        if "error" in res:
            print(f"{trainer}: failed ({res['error']})")
            continue
        res["fvu_eval"] = heldout_fvu(res["folder"], store, hook_in, hook_out)
        runs[trainer] = res
        print(f"{trainer:<9} FVU {res['fvu_eval']:.4f}  {res['tokens_per_s']:,.0f} tokens/s  ({res['train_seconds']:.1f} s)")
    out = {"settings": {k: v for k, v in vars(a).items()} | {"lr": lr, "rows": int(x.shape[0]), "hook_in": hook_in,
                                                              "hook_out": hook_out}, "runs": runs}
    if len(runs) == 2:
        s, p = runs["saekit"], runs["sparsify"]
        out["ratios"] = {"tokens_per_s": s["tokens_per_s"] / p["tokens_per_s"], "fvu": s["fvu_eval"] / p["fvu_eval"]}
        print(f"saekit / sparsify: tokens/s {out['ratios']['tokens_per_s']:.2f}x, held-out FVU {out['ratios']['fvu']:.3f}x")
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"results: {a.json}")


if __name__ == "__main__":
    main()
