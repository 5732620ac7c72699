"""Ground truth: saekit's kinds judged by whether they find a synthetic world's features.

    python benchmarks/truth.py                       # CPU: two small worlds, ~10 minutes on 2 busy cores
    python benchmarks/truth.py --features 16384 --d 768 --l0 25 --rows 1000000 --stream --tokens 200000000 \\
        --d-dict 16384 --k 25 --batch-size 4096 --device cuda --worlds plain   # the published synthetic benchmark's scale

With --stream, training reads fresh rows from the world's generator (`synth.stream_batches`,
on the device, never on disk: 200M rows of d = 768 would be 300 GB even in float16) and the
store holds only the held-out rows that are scored (--rows of them, all in its eval split).

Two worlds, the same rows, the same L0 (k = the world's mean L0 unless --k) and tokens for
every kind:
1. `plain`: features in superposition, power-law firing, uniform magnitudes;
2. `hierarchy`: the same plus parents with exclusive children (where absorption bites) and
   correlated groups.
Each kind (topk, batchtopk, jumprelu, matryoshka) is trained by `saekit.train` on the store
and scored by `saekit.truth` on held-out rows: MCC, mean best-latent F1, absorption, dead
fraction, L0, FVU, training tokens/s.  Ratios are printed against saekit's batchtopk in the
same run.  `--peers saelens,dictionary_learning,sparsify` also trains the peers' own TopK /
BatchTopK on the same training rows (benchmarks/peers/trainers.py in the peer venv that
benchmarks/peers/setup_peers.sh makes; same d_dict, k, batch size, tokens, seed and lr — saekit's
resolved lr unless --lr) and scores their folders, loaded through saekit's interop, by the same
`saekit.truth`.  Results: --json (default benchmarks/truth.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from saekit.dictionaries.base import Provenance
from saekit.store import ActivationStore
from saekit.synth import SynthConfig, stream_batches, synth
from saekit.store import store_eval_batches
from saekit.train import HookSource, TrainConfig, Trainer, default_lr, train
from saekit.config import from_flags
from saekit.truth import TruthConfig, score_truth

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from compare import DEFAULT_PEER_PYTHON, peer_available, run_trainer, train_rows, write_acts  # noqa: E402

KINDS = ("batchtopk", "topk", "jumprelu", "matryoshka")
TRUTH_PEER_KINDS = {"saelens": ("topk", "batchtopk", "jumprelu", "matryoshka"), "dictionary_learning": ("topk", "batchtopk", "jumprelu", "matryoshka"),
                    "sparsify": ("topk",)}
"""The peers' own trainers run here, per kind (trainers.py; SAELens's jumprelu in its target-L0 mode)."""
BASELINE = "batchtopk"


def worlds(a) -> dict[str, dict]:
    base = dict(n_features=a.features, d=a.d, rows=a.rows, l0=a.l0, power=0.5, holdout=0.02, seed=a.seed,
                generate_on=a.device if a.device != "auto" else "cpu")
    return {
        "plain": base,
        "hierarchy": base | dict(n_parents=max(1, a.features // 32), children=4, child_prob=0.5, exclusive=True,
                                 correlation=0.3, corr_group=4),
    }


def train_streamed(cfg: TrainConfig, world: SynthConfig) -> Path:
    """Train one dictionary on fresh generated rows; scale and final metrics from the world's (eval) store."""
    store = ActivationStore(cfg.store)
    prov = Provenance(hook=world.hook, model=store.model.to_dict(), hook_shape=[world.d],
                      scale=float(store.stats(world.hook)["scale"]), store=cfg.store)
    device = "cuda" if cfg.device in ("auto", "cuda") else cfg.device
    trainer = Trainer(cfg, {world.hook: HookSource(world.d, prov)}, stream_batches(world, cfg.batch_size, device), progress=False)
    trainer.fit()
    [path] = trainer.save(trainer.evaluate(store_eval_batches(store, [world.hook]), cfg.eval_tokens))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--l0", type=float, default=5.0)
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--tokens", type=int, default=500_000, help="training tokens per dictionary")
    p.add_argument("--d-dict", type=int, default=512)
    p.add_argument("--k", type=int, default=0, help="L0 of every kind (0: the world's mean L0, rounded)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--worlds", default="plain,hierarchy")
    p.add_argument("--eval-rows", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stream", action="store_true", help="train on fresh generated rows; the store holds only scored rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(Path(__file__).with_name("truth.json")))
    p.add_argument("--work", default="", help="folder for the stores and dictionaries (default: a temp dir, removed)")
    p.add_argument("--peers", default="", help="comma-separated: saelens, dictionary_learning, sparsify (their topk/batchtopk)")
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="python of the peer venv (setup_peers.sh)")
    p.add_argument("--lr", type=float, default=0.0, help="lr of every trainer (0: saekit's automatic lr, given to the peers too)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of saekit and of the peer processes (0: torch's default)")
    p.add_argument("--dead-tokens", type=int, default=-1, help="saekit's dead window (AuxK) in tokens (-1: saekit's default)")
    a = p.parse_args()
    k = a.k or max(1, round(a.l0))
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    kinds = [s for s in a.kinds.split(",") if s]
    work = Path(a.work or tempfile.mkdtemp(prefix="saekit-truth-"))
    results = {"settings": vars(a) | {"k": k}, "worlds": {}}
    try:
        for name, wcfg in worlds(a).items():
            if name not in a.worlds.split(","):
                continue
            store = work / f"world-{name}"
            world = SynthConfig(out=str(store), **(wcfg | ({"holdout": 0.999} if a.stream else {})))
            if not store.exists():
                t = time.perf_counter()
                synth(world)
                print(f"[{name}] generated {a.rows} rows in {time.perf_counter() - t:.1f}s")
            rows = {}
            for kind in kinds:
                out = work / f"dicts-{name}"
                t = time.perf_counter()
                tcfg = from_flags(TrainConfig, store=str(store), hooks=["synth"], kind=kind, k=[k], d_dict=a.d_dict, tokens=a.tokens,
                                   batch_size=a.batch_size, out=str(out), device=a.device, seed=a.seed, eval_tokens=4096,
                                   checkpoint_every=0, lr=a.lr or None, **({} if a.dead_tokens < 0 else {"dead_tokens": a.dead_tokens}))
                path = train_streamed(tcfg, world) if a.stream else train(tcfg, progress=False)[0]
                seconds = time.perf_counter() - t
                r = score_truth(TruthConfig(dicts=[str(path)], truth=str(store), max_rows=a.eval_rows,
                                            device="cuda" if a.device.startswith("cuda") else "cpu"))["dictionaries"][0]
                r.pop("per_feature")
                r["train_seconds"] = seconds
                # the training loop's own rate (as the peers report theirs), not the wall time with setup and eval
                r["tokens_per_s"] = json.loads((Path(path) / "config.json").read_text())["summary"].get("tokens_per_s")
                rows[kind] = r
                report(name, kind, r)
            if a.peers and not a.stream:
                rows |= peer_rows(a, name, store, work, k, kinds)
            results["worlds"][name] = rows
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    Path(a.json).write_text(json.dumps(results, indent=1))
    print(f"results: {a.json}")


def report(world: str, name: str, r: dict) -> None:
    print(f"[{world}] {name:<10} MCC {r['mcc']:.3f}  F1 {r['mean_f1']:.3f}  absorption "
          f"{'–' if r['absorption'] is None else format(r['absorption'], '.3f')}  dead {r['dead_frac']:.3f}  "
          f"L0 {r['l0']:.2f} (true {r['true_l0']:.2f})  FVU {r['fvu']:.4f}  {r['tokens_per_s']:,.0f} tok/s")


def peer_rows(a, world: str, store_path: Path, work: Path, k: int, kinds: list[str]) -> dict[str, dict]:
    """Each peer's topk / batchtopk trained on the store's training rows by its own trainer, scored like saekit's."""
    store = ActivationStore(str(store_path))
    hook = store.hooks[0]
    acts_dir = work / f"peer-acts-{world}"
    acts_dir.mkdir(exist_ok=True)
    acts = write_acts(acts_dir, store, hook, train_rows(store, hook, a.tokens))
    meta = json.loads((acts_dir / "meta.json").read_text())
    meta["hook"] = "blocks.0.hook_resid_post"  # sparsify names its folder after a layer; the truth scorer ignores the hook
    (acts_dir / "meta.json").write_text(json.dumps(meta))
    lr = a.lr or default_lr("batchtopk", a.d_dict)  # saekit's automatic lr (the same for topk and batchtopk)
    run_args = argparse.Namespace(k=k, l1=0.0, batch_size=a.batch_size, tokens=a.tokens, seed=a.seed, threads=a.threads)
    rows = {}
    for peer in [s for s in a.peers.split(",") if s]:
        why = peer_available(a.peer_python, peer)
        if why:
            print(f"[{world}] {peer}: skipped ({why})")
            continue
        for kind in kinds:
            if kind not in TRUTH_PEER_KINDS[peer]:
                continue
            res = run_trainer(a.peer_python, peer, kind, acts, work / f"peer-{world}-{peer}-{kind}", run_args, a.d_dict, lr)
            if "error" in res:
                print(f"[{world}] {peer} {kind}: failed ({res['error']})")
                continue
            r = score_truth(TruthConfig(dicts=[res["folder"]], truth=str(store_path), max_rows=a.eval_rows))["dictionaries"][0]
            r.pop("per_feature")
            r["train_seconds"] = res["train_seconds"]
            r["tokens_per_s"] = res["tokens_per_s"]
            r["lr"] = lr
            rows[f"{peer}-{kind}"] = r
            report(world, f"{peer}-{kind}", r)
    return rows


def print_table(results: dict) -> None:
    cols = ("mcc", "mean_f1", "absorption", "dead_frac", "l0", "fvu", "tokens_per_s")
    print(f"\n{'world':<10} {'kind':<26}" + "".join(f"{c:>13}" for c in cols) + "   ratios vs " + BASELINE + " (MCC, F1)")
    for world, rows in results["worlds"].items():
        base = rows.get(BASELINE)
        for kind, r in rows.items():
            vals = "".join(f"{'–':>13}" if r[c] is None else f"{r[c]:>13.4g}" for c in cols)
            ratio = f"   {r['mcc'] / base['mcc']:.3f}x, {r['mean_f1'] / base['mean_f1']:.3f}x" if base else ""
            print(f"{world:<10} {kind:<26}{vals}{ratio}")


if __name__ == "__main__":
    main()
