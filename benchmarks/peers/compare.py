"""saekit against its peers (SAELens, dictionary_learning, sparsify) on the same activations.

    python benchmarks/peers/compare.py                       # the toy model's store, TopK and ReLU/L1
    python benchmarks/peers/compare.py --store runs/demo/store --tokens 4000000

One run, back to back, on one machine:

1. the activation store: `--store DIR` (any store `saekit harvest` wrote), or the built-in toy
   model's, harvested once into <work>/toy-store from a generated FSM corpus (reused after);
2. its train split (counted rows, the hook's original units) read into memory once, written
   to <work>/acts.safetensors (+ meta.json) for every trainer, capped at the token budget;
3. for each kind (topk, relu, batchtopk) and each toolkit (saekit + the peers installed in the peer venv,
   see setup_peers.sh): one subprocess `trainers.py` trains one SAE with the same d_dict, k or
   λ, batch size, learning rate, token budget, seed, torch threads and batch order, and reports
   training tokens/s and peak memory (ru_maxrss, same method for all);
4. every resulting dictionary is loaded through saekit's interop (`saekit.load`: SAELens and
   sparsify folders; dictionary_learning's weights are rewritten as a SAELens folder by the
   runner) and judged by one definition, `saekit.splice.evaluate`, on the same held-out tokens
   (the store's eval split): FVU, L0, dead fraction, loss recovered (zero- and mean-ablation);
5. a table with saekit / peer ratios is printed and everything is written to <work>/results.json;
6. with `--l1-sweep λ1,λ2,...` every toolkit's ReLU/L1 SAE is also trained at each λ, and the
   toolkits are compared at equal L0: along each one's (L0, FVU) and (L0, loss recovered)
   frontier, saekit's values are interpolated (piecewise linear in log L0, no extrapolation)
   at every L0 a peer reached, and the ratios are printed and written under "frontier".

A peer that is not installed (or fails) is reported as such and the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
PEERS = ("saelens", "dictionary_learning", "sparsify")
PEER_KINDS = {"saelens": ("topk", "relu", "batchtopk"), "dictionary_learning": ("topk", "relu", "batchtopk"), "sparsify": ("topk",)}
DEFAULT_PEER_PYTHON = os.path.join(os.environ.get("SAELENS_VENV", "/work/venv-saelens"), "bin", "python")


# --- data -----------------------------------------------------------------------------------------

def toy_store(work: Path, n_seq: int, hook: str, seed: int) -> Path:
    """Harvest (or reuse) the toy model's store: a generated FSM corpus, one walk per sequence."""
    from saekit.harvest import HarvestConfig, harvest
    from saekit.toy.corpus import ToyDataConfig, write_corpus

    text = work / "toy.txt"
    if not text.is_file():
        write_corpus(ToyDataConfig(out=str(text), n_seq=n_seq, seed=seed, model="toy"))
    return harvest(HarvestConfig(model="toy", hooks=[hook], data=str(text), packing="doc", out=str(work / "toy-store"),
                                 seed=seed), progress=False)


def train_rows(store, hook: str, max_rows: int) -> torch.Tensor:
    """The counted rows (no padding, no BOS) of the train split, in store order, at most max_rows: float32 (n, width)."""
    parts, n = [], 0
    for _, tokens, acts in store.iter_sequences([hook], "train", 256):
        rows = torch.as_tensor(acts[hook])[torch.as_tensor(store.row_mask(tokens), dtype=torch.bool)]
        parts.append(rows.float())
        n += rows.shape[0]
        if n >= max_rows:
            break
    return torch.cat(parts)[:max_rows].contiguous()


def write_acts(work: Path, store, hook: str, rows: torch.Tensor) -> Path:
    """acts.safetensors {train} + meta.json {hook, model, hook_shape, scale, store}, written under temp names first."""
    path = work / "acts.safetensors"
    save_file({"train": rows}, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    meta = {"hook": hook, "model": store.model.to_dict(), "hook_shape": list(store.hook_shape(hook)),
            "scale": float(store.stats(hook)["scale"]), "store": str(store.path), "rows": int(rows.shape[0])}
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    return path


# --- training runs --------------------------------------------------------------------------------

def run_trainer(python: str, trainer: str, kind: str, acts: Path, out: Path, a, d_dict: int, lr: float,
                l1: float | None = None) -> dict:
    """One subprocess of trainers.py; its result.json, or {"error": ...} with the tail of its output."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [python, str(HERE / "trainers.py"), "--trainer", trainer, "--kind", kind, "--acts", str(acts), "--out", str(out),
           "--d-dict", str(d_dict), "--k", str(a.k), "--l1", str(a.l1 if l1 is None else l1), "--lr", repr(lr), "--batch-size", str(a.batch_size),
           "--tokens", str(a.tokens), "--seed", str(a.seed), "--threads", str(a.threads)]
    # No TQDM_DISABLE: a disabled tqdm closes the generator it wraps when the loop over it breaks, so
    # dictionary_learning's norm-factor pass would end the batch stream before its training loop.
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    res_file = out / "result.json"
    if proc.returncode != 0 or not res_file.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"trainer": trainer, "kind": kind, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(res_file.read_text())


def peer_available(python: str, peer: str) -> str | None:
    """None if `peer` imports in the peer venv, else why not."""
    if not Path(python).is_file():
        return f"no peer python at {python}; run benchmarks/peers/setup_peers.sh"
    module = {"saelens": "sae_lens", "dictionary_learning": "dictionary_learning", "sparsify": "sparsify"}[peer]
    proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"{module} does not import: {proc.stderr.strip().splitlines()[-1:]}"


# --- evaluation -----------------------------------------------------------------------------------

def evaluate_all(store, hook: str, runs: list[dict], eval_tokens: int, batch_size: int) -> None:
    """Splice every trained dictionary into the model on the store's eval split; adds an "eval" dict to each run."""
    from saekit.interop import load
    from saekit.models import load_model
    from saekit.splice import evaluate, resolve_target, store_tokens

    ok = [r for r in runs if "folder" in r]
    if not ok:
        return
    model = load_model(store.model.name, compat=store.model.compat)
    targets = []
    for r in ok:
        d = load(r["folder"])
        # Peers' folders may not record the hook or model in saekit's terms; they were trained on this one.
        d.prov.hook = d.prov.hook or hook
        d.prov.model = d.prov.model or store.model.to_dict()
        targets.append(resolve_target(f"{r['trainer']}/{r['kind']}", d, model))
    tokens = store_tokens(store, eval_tokens)
    # The store's eval split may hold fewer tokens than asked for (the toy store: 150 sequences).
    print(f"evaluating {len(ok)} dictionaries with saekit.splice on {tokens.numel():,} held-out tokens "
          f"({tokens.shape[0]} sequences; asked for {eval_tokens:,}) …", flush=True)
    means = {hook: torch.as_tensor(np.asarray(store.stats(hook)["mean"]), dtype=torch.float32)}
    res = evaluate(model, targets, tokens, means, batch_size=batch_size)
    for r, row in zip(ok, res["dictionaries"]):
        r["eval"] = {k: row[k] for k in ("fvu", "l0", "dead_frac", "loss_recovered_zero", "loss_recovered_mean", "delta_ce", "kl")}
        r["eval"]["tokens"] = res["eval"]["tokens"]


# --- equal-L0 comparison (λ sweep) ----------------------------------------------------------------

def interpolate_at(points: list[tuple[float, float]], l0: float) -> float | None:
    """The value at `l0` along a frontier [(L0, value), ...]: piecewise linear in log L0 between the two
    neighbouring points; None outside the frontier's L0 range (no extrapolation) or with < 2 points."""
    pts = sorted((x, y) for x, y in points if x > 0 and y is not None and math.isfinite(y))
    if len(pts) < 2 or not pts[0][0] <= l0 <= pts[-1][0]:
        return None
    xs = [math.log(x) for x, _ in pts]
    return float(np.interp(math.log(l0), xs, [y for _, y in pts]))


FRONTIER_METRICS = ("fvu", "loss_recovered_zero", "loss_recovered_mean")


def frontier_compare(sweep: list[dict]) -> dict:
    """For each peer: at every L0 it reached, its metrics next to saekit's interpolated at that L0."""
    by = {}
    for r in sweep:
        if "eval" in r:
            by.setdefault(r["trainer"], []).append(r)
    ours = by.get("saekit", [])
    out = {}
    for peer, rs in by.items():
        if peer == "saekit":
            continue
        rows = []
        for r in sorted(rs, key=lambda r: r["eval"]["l0"]):
            l0 = r["eval"]["l0"]
            row = {"l1": r["l1"], "l0": l0}
            for m in FRONTIER_METRICS:
                mine = interpolate_at([(o["eval"]["l0"], o["eval"][m]) for o in ours], l0)
                row[m] = {"peer": r["eval"][m], "saekit": mine}
            if row["fvu"]["saekit"] is not None:
                row["fvu_ratio"] = row["fvu"]["saekit"] / max(row["fvu"]["peer"], 1e-12)
            rows.append(row)
        out[peer] = rows
    out["points"] = {t: sorted(({"l1": r["l1"], **{k: r["eval"][k] for k in ("l0", "dead_frac", *FRONTIER_METRICS)}}
                                for r in rs), key=lambda p: p["l0"]) for t, rs in by.items()}
    return out


def print_frontier(front: dict) -> None:
    print("ReLU/L1 at equal L0 (saekit interpolated along its λ frontier at each peer point; — = outside saekit's L0 range):")
    for peer, rows in front.items():
        if peer == "points":
            continue
        for row in rows:
            f = lambda v, s: "—" if v is None else format(v, s)  # noqa: E731
            print(f"  {peer:20s} λ {row['l1']:<5g} L0 {row['l0']:6.1f}  FVU peer {row['fvu']['peer']:.4f} saekit "
                  f"{f(row['fvu']['saekit'], '.4f')} (×{f(row.get('fvu_ratio'), '.2f')})  loss rec. (zero) peer "
                  f"{row['loss_recovered_zero']['peer']:.4f} saekit {f(row['loss_recovered_zero']['saekit'], '.4f')}")


# --- report ---------------------------------------------------------------------------------------

def ratios(ours: dict, peer: dict) -> dict:
    """saekit / peer: speed (>1 = saekit faster), memory and FVU (<1 = saekit better); loss recovered as a difference."""
    out = {}
    if "tokens_per_s" in ours and "tokens_per_s" in peer:
        out["speed"] = ours["tokens_per_s"] / peer["tokens_per_s"]
        out["train_memory"] = ours["train_rss_mb"] / max(peer["train_rss_mb"], 1e-9)
    if "eval" in ours and "eval" in peer:
        out["fvu"] = ours["eval"]["fvu"] / max(peer["eval"]["fvu"], 1e-12)
        out["l0"] = ours["eval"]["l0"] / max(peer["eval"]["l0"], 1e-12)
        out["loss_recovered_mean_diff"] = ours["eval"]["loss_recovered_mean"] - peer["eval"]["loss_recovered_mean"]
    return out


def print_table(runs: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="saekit vs peers (same activations, hyperparameters and held-out tokens)")
    for col in ("kind", "trainer", "tok/s", "×speed", "train MB", "×mem", "FVU", "×FVU", "L0", "dead", "LR(mean)", "LR(zero)"):
        t.add_column(col, justify="left" if col in ("kind", "trainer") else "right")
    for r in runs:
        if "error" in r:
            t.add_row(r["kind"], r["trainer"], *["—"] * 9, f"[red]{r['error'][:60]}")
            continue
        e, q = r.get("eval", {}), r.get("ratio", {})
        f = lambda v, s: "—" if v is None else format(v, s)  # noqa: E731
        t.add_row(r["kind"], r["trainer"], f(r["tokens_per_s"], ",.0f"), f(q.get("speed"), ".2f"), f(r["train_rss_mb"], ".0f"),
                  f(q.get("train_memory"), ".2f"), f(e.get("fvu"), ".4f"), f(q.get("fvu"), ".3f"), f(e.get("l0"), ".1f"),
                  f(e.get("dead_frac"), ".1%"), f(e.get("loss_recovered_mean"), ".4f"), f(e.get("loss_recovered_zero"), ".4f"))
    Console(width=max(160, shutil.get_terminal_size().columns)).print(t)
    print("×speed, ×mem, ×FVU: saekit / that peer (speed > 1 and FVU, memory < 1 favour saekit); LR = loss recovered.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="activation store to use (default: harvest the toy model's into <work>/toy-store)")
    ap.add_argument("--hook", help="hook to train on (default: the store's first; toy: the pipeline's default hook)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-peers"), help="folder for the store, activations, dictionaries and results.json")
    ap.add_argument("--kinds", default="topk,relu", help="comma-separated: topk, relu, batchtopk")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {', '.join(PEERS)}")
    ap.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per dictionary (same for all)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--d-dict", type=int, default=0, help="latents (0: --expansion × width)")
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32, help="TopK: active latents per token")
    ap.add_argument("--l1", type=float, default=5.0, help="ReLU: λ in saekit's (= SAELens's) convention")
    ap.add_argument("--lr", type=float, default=0.0, help="Adam learning rate for all (0: saekit's default for the size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every trainer process")
    ap.add_argument("--l1-sweep", default="", help="ReLU: comma-separated λ values; every toolkit trains at each, compared at equal L0")
    ap.add_argument("--repeats", type=int, default=1, help="train each (kind, toolkit) this many times (alternating); the fastest is reported")
    ap.add_argument("--max-rows", type=int, default=1_000_000, help="rows of the train split held in memory (the budget cycles over them)")
    ap.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens for the splice evaluation")
    ap.add_argument("--toy-seqs", type=int, default=4000, help="toy corpus sequences when no --store is given")
    ap.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="python of the peer venv (setup_peers.sh)")
    a = ap.parse_args()

    from saekit.errors import SaekitError
    from saekit.store import ActivationStore
    from saekit.train import default_lr

    try:
        a.work = a.work.resolve()
        a.work.mkdir(parents=True, exist_ok=True)
        kinds = [k for k in a.kinds.split(",") if k]
        peers = [p for p in a.peers.split(",") if p]
        bad = [k for k in kinds if k not in ("topk", "relu", "batchtopk")] + [p for p in peers if p not in PEERS]
        if bad:
            raise SaekitError(f"unknown kind or peer {', '.join(bad)}; kinds: topk, relu, batchtopk; peers: {', '.join(PEERS)}")
        try:
            sweep_l1 = [float(v) for v in a.l1_sweep.split(",") if v.strip()]
        except ValueError:
            raise SaekitError(f"--l1-sweep {a.l1_sweep!r} is not a comma-separated list of numbers, e.g. 1,2,5,10") from None
        if sweep_l1 and "relu" not in kinds:
            raise SaekitError("--l1-sweep needs kind relu in --kinds")
        t0 = time.perf_counter()
        if not a.store:
            from saekit.pipeline import default_hook

            a.hook = a.hook or default_hook("toy")
        store_path = a.store or toy_store(a.work, a.toy_seqs, a.hook, a.seed)
        store = ActivationStore(store_path)
        hook = a.hook or store.hooks[0]
        if hook not in store.hooks:
            raise SaekitError(f"hook {hook} is not in store {store_path}; it has {', '.join(store.hooks)}")
        rows = train_rows(store, hook, min(a.max_rows, a.tokens))
        acts = write_acts(a.work, store, hook, rows)
        width = rows.shape[1]
        d_dict = a.d_dict or a.expansion * width
        lr = a.lr or default_lr("topk", d_dict)
        print(f"store {store_path}: hook {hook}, width {width}, {rows.shape[0]:,} train rows in memory "
              f"({time.perf_counter() - t0:.0f}s); d_dict {d_dict}, k {a.k}, λ {a.l1}, lr {lr:.3g}, batch {a.batch_size}, "
              f"{a.tokens:,} tokens, {a.threads} threads")
    except SaekitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    missing = {p: why for p in peers if (why := peer_available(a.peer_python, p))}
    for p, why in missing.items():
        print(f"skipping {p}: {why}")
    runs: list[dict] = []
    for kind in kinds:
        plan = [("saekit", sys.executable)] + [(p, a.peer_python) for p in peers if p not in missing and kind in PEER_KINDS[p]]
        best: dict[str, dict] = {}
        for rep in range(a.repeats):
            order = plan if rep % 2 == 0 else plan[::-1]  # alternate so drifting machine load hits everyone alike
            for trainer, python in order:
                r = run_trainer(python, trainer, kind, acts, a.work / "dicts" / f"{kind}-{trainer}", a, d_dict, lr)
                msg = r.get("error") or f"{r['tokens_per_s']:,.0f} tok/s, +{r['train_rss_mb']:.0f} MB"
                print(f"  {kind:5s} {trainer:20s} run {rep + 1}: {msg}", flush=True)
                prev = best.get(trainer)
                if prev is None or ("error" in prev and "error" not in r) or (
                        "error" not in r and "error" not in prev and r["tokens_per_s"] > prev["tokens_per_s"]):
                    best[trainer] = r
                    if "folder" in r:  # keep this run's dictionary: a later, slower repeat would overwrite it
                        keep = a.work / "dicts" / f"{kind}-{trainer}.best"
                        shutil.rmtree(keep, ignore_errors=True)
                        shutil.copytree(a.work / "dicts" / f"{kind}-{trainer}", keep)
                        r["folder"] = str(keep / Path(r["folder"]).relative_to(a.work / "dicts" / f"{kind}-{trainer}"))
        runs += [best[t] for t, _ in plan]

    sweep: list[dict] = []
    if sweep_l1:
        plan = [("saekit", sys.executable)] + [(p, a.peer_python) for p in peers if p not in missing and "relu" in PEER_KINDS[p]]
        for lam in sweep_l1:
            for trainer, python in plan:
                prev = next((r for r in runs if r["kind"] == "relu" and r["trainer"] == trainer), None)
                if lam == a.l1 and prev is not None:  # already trained above
                    prev["l1"] = lam
                    sweep.append(prev)
                    continue
                r = run_trainer(python, trainer, "relu", acts, a.work / "sweep" / f"l1_{lam:g}-{trainer}", a, d_dict, lr, l1=lam)
                r["l1"] = lam
                print(f"  relu  {trainer:20s} λ {lam:g}: {r.get('error') or format(r['tokens_per_s'], ',.0f') + ' tok/s'}", flush=True)
                sweep.append(r)

    evaluate_all(store, hook, runs + [r for r in sweep if not any(r is q for q in runs)], a.eval_tokens, batch_size=8)
    for kind in kinds:
        ours = next((r for r in runs if r["kind"] == kind and r["trainer"] == "saekit"), {})
        for r in runs:
            if r["kind"] == kind and r["trainer"] != "saekit":
                r["ratio"] = ratios(ours, r)
    print_table(runs)
    front = frontier_compare(sweep) if sweep else None
    if front:
        print_frontier(front)
    result = {
        "setup": {"store": str(store_path), "hook": hook, "width": width, "train_rows": int(rows.shape[0]), "d_dict": d_dict,
                  "k": a.k, "l1": a.l1, "lr": lr, "batch_size": a.batch_size, "tokens": a.tokens, "seed": a.seed,
                  "threads": a.threads, "repeats": a.repeats, "l1_sweep": sweep_l1, "eval_tokens": a.eval_tokens, "torch": torch.__version__,
                  "skipped": missing},
        "runs": runs,
        "frontier": front,
    }
    out = a.work / "results.json"
    out.with_suffix(".json.tmp").write_text(json.dumps(result, indent=2, default=float))
    os.replace(out.with_suffix(".json.tmp"), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
