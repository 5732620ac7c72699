"""Ground truth for the ReLU (L1) kind: every toolkit's λ searched to a target L0, then compared there.

    python benchmarks/truth_relu.py --peer-python $VENV/bin/python --threads 1      # ~40 min of one core

A ReLU SAE has no k: its L0 follows the L1 coefficient λ, differently per toolkit (SAELens's λ
reaches a given L0 at ~10× saekit's on the toy store), so the same λ is not the same sparsity.
For each target L0 (--targets, default 5 and 10) a world is generated whose mean true L0 is that
target (truth.py's worlds, `--l0 target`: plain and hierarchy+correlation), and every toolkit's
ReLU trainer (benchmarks/peers/trainers.py, the same training rows and batch order, d_dict, batch
size, tokens, seed, lr and threads) is run at a few λ found by a search on the held-out L0:
×/÷ 4 until the target is bracketed, then the secant in log λ against log L0, until a point lies
within --tol of the target or --max-runs is spent.  Every run is scored by `saekit.truth` on the
same held-out rows.  At the target each toolkit is reported twice: the run nearest the target (its
L0 reached, as measured), and every metric interpolated linearly in log L0 between the two runs
that bracket the target (None where none does; no extrapolation).

Toolkits: saekit `relu` (decoder-norm-weighted L1), SAELens `standard` (the same loss),
dictionary_learning `StandardTrainer` (unit decoder columns, plain L1) and its
`StandardTrainerAprilUpdate` (decoder-norm-weighted L1).  sparsify has no ReLU/L1 trainer.

JumpReLU the same way (`--toolkits saekit_jumprelu,saelens_jumprelu_tanh --json ...`): SAELens's
JumpReLU in the setup its docs recommend (tanh loss; trainers.py `jumprelu_tanh`) has no target L0,
so its `l0_coefficient` is searched like λ (`saelens_jumprelu_quadratic`: the same for its target-L0 mode,
target_l0 = the target); saekit's jumprelu takes a target L0 k, an integer, so its
search steps k by the ratio target / L0 reached (L0 rises with k) and the read-out interpolates between
the k that bracket the target.  In the JSON `l1` is each run's value of its toolkit's knob (`knob`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from saekit.store import ActivationStore
from saekit.synth import SynthConfig, synth
from saekit.train import default_lr
from saekit.truth import TruthConfig, score_truth

sys.path.insert(0, str(Path(__file__).parent / "peers"))
from compare import DEFAULT_PEER_PYTHON, interpolate_at, peer_available, run_trainer, train_rows, write_acts  # noqa: E402
from truth import worlds  # noqa: E402

TOOLKITS = {"saekit": ("saekit", "relu", "l1"), "saelens": ("saelens", "relu", "l1"), "dictionary_learning": ("dictionary_learning", "relu", "l1"),
            "dictionary_learning_april": ("dictionary_learning", "relu_april", "l1"),
            "saekit_jumprelu": ("saekit", "jumprelu", "k"), "saelens_jumprelu_tanh": ("saelens", "jumprelu_tanh", "l1"),
            "saelens_jumprelu_quadratic": ("saelens", "jumprelu_quadratic", "l1")}
"""name → (trainers.py --trainer, --kind, the knob searched: `l1` (λ, or SAELens JumpReLU's l0_coefficient) or `k`)."""
DEFAULT_TOOLKITS = ("saekit", "saelens", "dictionary_learning", "dictionary_learning_april")
START_L1 = {"saekit": 4.0, "saelens": 100.0, "dictionary_learning": 4.0, "dictionary_learning_april": 30.0, "saelens_jumprelu_tanh": 5.0,
            "saelens_jumprelu_quadratic": 4.0}
"""First λ of a search (saekit's convention; trainers.py converts), from a short trial on the L0-5 plain world; later searches
start from the last.  SAELens's JumpReLU: its docs' l0_coefficient.  A `k` search starts at the target."""
METRICS = ("mcc", "mean_f1", "absorption", "dead_frac", "l0", "fvu", "tokens_per_s")


def next_l1(points: list[tuple[float, float]], target: float) -> float:
    """The next λ to try from [(λ, L0)]: ×/÷ 4 until the target is bracketed (×/÷ 1.15 from a run within 1.5× of
    it: L0 falls steeply with λ), then the secant in log-log."""
    above = [p for p in points if p[1] > target]  # too dense: λ too small
    below = [p for p in points if p[1] <= target]
    step = 1.15 if any(1 / 1.5 <= z / target <= 1.5 for _, z in points) else 4.0
    if not below:
        return max(p[0] for p in above) * step
    if not above:
        return min(p[0] for p in below) / step
    (l_a, z_a), (l_b, z_b) = max(above, key=lambda p: p[0]), min(below, key=lambda p: p[0])
    if z_b <= 0:  # all latents dead at the upper λ: bisect in log λ
        return math.sqrt(l_a * l_b)
    t = (math.log(target) - math.log(z_a)) / (math.log(z_b) - math.log(z_a))
    t = min(max(t, 0.15), 0.85)  # keep inside the bracket, away from its ends
    return math.exp(math.log(l_a) + t * (math.log(l_b) - math.log(l_a)))


def next_k(points: list[tuple[float, float]], target: float) -> int | None:
    """The next integer k to try from [(k, L0)] (L0 rises with k): the nearest run's k scaled by target / L0, moved
    to an untried k on the target's side; None once the target lies between two adjacent k already run."""
    tried = {round(k) for k, _ in points}
    k0, z0 = min(points, key=lambda p: abs(math.log(max(p[1], 1e-9) / target)))
    step = 1 if z0 < target else -1
    k = max(1, round(k0 * target / max(z0, 1e-9)))
    if (k - k0) * step <= 0:  # rounding kept it in place or the wrong way
        k = round(k0) + step
    while k in tried and k >= 1:
        k += step
    above = [round(q) for q, z in points if z > target]
    below = [round(q) for q, z in points if z <= target]
    if k < 1 or (above and k >= min(above)) or (below and k <= max(below)):
        return None  # no untried k strictly inside the bracket
    return k


def at_target(runs: list[dict], target: float) -> dict:
    """The run nearest the target L0 (ratio distance), and every metric interpolated at the target."""
    ok = [r for r in runs if r.get("l0") is not None]
    nearest = min(ok, key=lambda r: abs(math.log(max(r["l0"], 1e-9) / target)))
    interp = {m: interpolate_at([(r["l0"], r[m]) for r in ok if r[m] is not None], target) for m in METRICS if m != "l0"}
    interp["l1"] = interpolate_at([(r["l0"], r["l1"]) for r in ok], target)
    return {"nearest": {m: nearest.get(m) for m in (*METRICS, "l1")}, "interpolated": interp if interp["mcc"] is not None else None}


def search(a, name: str, acts: Path, store: Path, work: Path, target: float, start: float, lr: float) -> list[dict]:
    """Train `name`'s SAE at knob values chosen by `next_l1` (or `next_k`) until one lands within a.tol of the target L0."""
    trainer, kind, knob = TOOLKITS[name]
    runs: list[dict] = []
    l1 = float(round(target)) if knob == "k" else start
    for _ in range(a.max_runs):
        k = round(l1) if knob == "k" else max(1, round(target))  # a target-L0 kind searched on its coefficient keeps k = target
        args = argparse.Namespace(k=k, l1=l1, batch_size=a.batch_size, tokens=a.tokens, seed=a.seed, threads=a.threads)
        python = sys.executable if trainer == "saekit" else a.peer_python
        res = run_trainer(python, trainer, kind, acts, work / f"{name}-{knob}_{l1:.4g}", args, a.d_dict, lr)
        if "error" in res:
            print(f"    {name} λ {l1:.4g}: failed ({res['error']})", flush=True)
            break
        r = score_truth(TruthConfig(dicts=[res["folder"]], truth=str(store), max_rows=a.eval_rows))["dictionaries"][0]
        r.pop("per_feature")
        r |= {"l1": l1, "train_seconds": res["train_seconds"], "tokens_per_s": res["tokens_per_s"], "lr": lr}
        runs.append(r)
        print(f"    {name:<26} {knob} {l1:<8.4g} L0 {r['l0']:6.2f}  MCC {r['mcc']:.3f}  F1 {r['mean_f1']:.3f}  dead {r['dead_frac']:.3f}  "
              f"FVU {r['fvu']:.4f}  {r['tokens_per_s']:,.0f} tok/s", flush=True)
        shutil.rmtree(work / f"{name}-{knob}_{l1:.4g}", ignore_errors=True)
        pts = [(q["l1"], q["l0"]) for q in runs]
        bracketed = any(z > target for _, z in pts) and any(z <= target for _, z in pts)
        if bracketed and any(abs(z / target - 1) <= a.tol for _, z in pts):
            break
        nxt = next_k(pts, target) if knob == "k" else next_l1(pts, target)
        if nxt is None:
            break
        l1 = float(nxt)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="5,10", help="target L0s; each gets worlds with that mean true L0")
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--tokens", type=int, default=500_000)
    p.add_argument("--d-dict", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--worlds", default="plain,hierarchy")
    p.add_argument("--toolkits", default=",".join(DEFAULT_TOOLKITS), help="of: " + ", ".join(TOOLKITS))
    p.add_argument("--eval-rows", type=int, default=8192)
    p.add_argument("--max-runs", type=int, default=5, help="λ values per (world, toolkit) search at most")
    p.add_argument("--tol", type=float, default=0.1, help="stop a search once a run's L0 is within this fraction of the target")
    p.add_argument("--lr", type=float, default=0.0, help="lr of every trainer (0: saekit's automatic lr for relu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON)
    p.add_argument("--work", default="")
    p.add_argument("--json", default=str(Path(__file__).with_name("truth-peers-relu.json")))
    p.add_argument("--start-l1", default="", help="first λ per toolkit, e.g. saekit=5,saelens=6 (default: START_L1)")
    a = p.parse_args()
    lr = a.lr or default_lr("relu", a.d_dict)
    work = Path(a.work or tempfile.mkdtemp(prefix="saekit-truth-relu-"))
    names = []
    for n in [n for n in a.toolkits.split(",") if n]:
        if TOOLKITS[n][0] != "saekit" and (why := peer_available(a.peer_python, TOOLKITS[n][0])):
            print(f"{n}: skipped ({why})")
        else:
            names.append(n)
    results = {"settings": vars(a) | {"lr": lr}, "targets": {}}
    if any(TOOLKITS[n][1].startswith("relu") for n in names):
        results["settings"]["sparsify"] = "no ReLU/L1 trainer (it trains TopK sparse coders only)"
    start = dict(START_L1) | {n: float(v) for n, v in (kv.split("=") for kv in a.start_l1.split(",") if kv)}
    try:
        for target in [float(t) for t in a.targets.split(",")]:
            wa = argparse.Namespace(features=a.features, d=a.d, rows=a.rows, l0=target, seed=a.seed, device="cpu")
            for wname, wcfg in worlds(wa).items():
                if wname not in a.worlds.split(","):
                    continue
                store = work / f"world-{wname}-l0_{target:g}"
                t = time.perf_counter()
                if not store.exists():
                    synth(SynthConfig(out=str(store), **wcfg))
                st = ActivationStore(str(store))
                acts_dir = work / f"acts-{wname}-l0_{target:g}"
                acts_dir.mkdir(exist_ok=True)
                acts = write_acts(acts_dir, st, st.hooks[0], train_rows(st, st.hooks[0], a.tokens))
                meta = json.loads((acts_dir / "meta.json").read_text())
                meta["hook"] = "blocks.0.hook_resid_post"  # dictionary_learning and SAELens folders want a layer name
                (acts_dir / "meta.json").write_text(json.dumps(meta))
                print(f"[{wname}, target L0 {target:g}] world ready in {time.perf_counter() - t:.0f}s", flush=True)
                row = {}
                for n in names:
                    runs = search(a, n, acts, store, work, target, start.get(n, 1.0), lr)
                    if runs:
                        row[n] = {"knob": TOOLKITS[n][2], "runs": runs, **at_target(runs, target)}
                        start[n] = row[n]["nearest"]["l1"] if row[n]["interpolated"] is None else row[n]["interpolated"]["l1"]
                results["targets"].setdefault(f"{target:g}", {})[wname] = row
                shutil.rmtree(acts_dir, ignore_errors=True)
                tmp = Path(a.json + ".tmp")  # after every world: a long run killed late keeps what it measured
                tmp.write_text(json.dumps(results, indent=1))
                os.replace(tmp, a.json)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    print(f"results: {a.json}")


def print_table(results: dict) -> None:
    print(f"\n{'L0':>4} {'world':<10} {'toolkit':<26} {'knob':>8} {'L0 reached':>10} {'MCC':>7} {'F1':>7} {'absorb':>7} {'dead':>7} "
          f"{'tok/s':>8}   interpolated at target (MCC, F1)   saekit/this (MCC, F1)")
    for target, by_world in results["targets"].items():
        for world, row in by_world.items():
            ours = next((r for n, r in row.items() if TOOLKITS[n][0] == "saekit"), None)
            for n, r in row.items():
                q, i = r["nearest"], r["interpolated"]
                f = lambda v, s: "–" if v is None else format(v, s)  # noqa: E731
                interp = f"{f(i and i['mcc'], '.3f')}, {f(i and i['mean_f1'], '.3f')}"
                ratio = ""
                if ours and TOOLKITS[n][0] != "saekit":
                    a_, b_ = (ours["interpolated"], i) if ours["interpolated"] and i else (ours["nearest"], q)
                    ratio = f"{a_['mcc'] / b_['mcc']:.3f}×, {a_['mean_f1'] / max(b_['mean_f1'], 1e-9):.3f}×"
                print(f"{target:>4} {world:<10} {n:<26} {q['l1']:>8.3g} {q['l0']:>10.2f} {q['mcc']:>7.3f} {q['mean_f1']:>7.3f} "
                      f"{f(q['absorption'], '.3f'):>7} {q['dead_frac']:>7.3f} {q['tokens_per_s']:>8,.0f}   {interp:<34} {ratio}")


if __name__ == "__main__":
    main()
