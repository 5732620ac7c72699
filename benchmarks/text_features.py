"""Are features on real text explainable, and can topics be steered?  Measured on the pycode text model.

One run, everything through the `saekit` command as a user would type it:

1. `saekit pycode data` writes held-out Python source (files the model never trained on);
   `saekit harvest` stores one hook of the pycode model over it (30% of sequences held out).
2. `saekit train` trains a TopK SAE and a codebook on the store's train split.
3. `saekit analyze` explains every feature by a token rule found on the train split and scores
   it on the eval split; single neurons of the same hook, firing at the SAE's median feature
   frequency, are explained the same way (the floor).  Reported: the share of live features
   with held-out F1 >= 0.5.
4. `saekit steer --topic` for several topics of Python source: the best-matching features are
   switched on over off-topic held-out prompts; the share of on-topic continuations, steered
   vs unsteered, at a few strengths.

    python benchmarks/text_features.py --work runs/bench-text [--tokens 200000]

Writes <work>/results.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TOPICS = {
    "exceptions": r"\b(raise|except)\b|Error\b|Exception\b",
    "file I/O": r"\bopen\(|\.read\(|\.write\(|\.close\(|\bfile\b",
    "tests and assertions": r"\bassert\w*|\btest\w*",
}


def run(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "saekit", *args]
    print("$ saekit " + " ".join(args), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, COLUMNS="200", HF_HUB_OFFLINE="1"))
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-text")
    ap.add_argument("--hook", default="blocks.1.hook_resid_post")
    ap.add_argument("--harvest-tokens", type=int, default=120_000)
    ap.add_argument("--tokens", type=int, default=300_000, help="training tokens per dictionary")
    ap.add_argument("--strengths", default="4,8,16")
    ap.add_argument("--n-prompts", type=int, default=10)
    ap.add_argument("--samples", type=int, default=5)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = work / "heldout.jsonl"
    if not data.exists():
        run(["pycode", "data", "--out", str(data), "--split", "heldout"])
    store = work / "store"
    if not (store / "manifest.json").exists():
        run(["harvest", "--model", "pycode", "--data", str(data), "--hooks", args.hook, "--out", str(store),
             "--tokens", str(args.harvest_tokens), "--holdout", "0.3"])
    dicts = work / "dicts"
    sae = dicts / args.hook / "topk-k16"
    cb = dicts / args.hook / "codebook-k8"
    if not (sae / "weights.safetensors").exists():
        run(["train", "--store", str(store), "--hook", args.hook, "--kind", "topk", "--k", "16", "--expansion", "4",
             "--tokens", str(args.tokens), "--out", str(dicts)])
    if not (cb / "weights.safetensors").exists():
        run(["train", "--store", str(store), "--hook", args.hook, "--kind", "codebook", "--k", "8", "--d-dict", "512",
             "--tokens", str(args.tokens), "--out", str(dicts)])

    from saekit.analysis.analyze import load_analysis
    from saekit.analysis.explain import explain_neurons, share_explained
    from saekit.models import load_model
    from saekit.store import ActivationStore

    results: dict = {"hook": args.hook, "explained": {}, "topics": {}}
    med_freq = None
    for name, d in (("TopK SAE (k 16, 512)", sae), ("codebook (k 8, 512)", cb)):
        out = work / ("analysis-" + d.name)
        if not (out / "features.json").exists():
            run(["analyze", "--dict", str(d), "--store", str(store), "--out", str(out)])
        meta = load_analysis(out).meta
        live = [f for f in meta["features"] if f["count"] > 0 and f["explanation"]["heldout_fires"] > 0]
        share = sum(f["explanation"]["f1"] >= 0.5 for f in live) / max(len(live), 1)
        results["explained"][name] = {"share_f1_ge_0.5": share, "live_scored": len(live),
                                      "best": sorted(((f["explanation"]["f1"], f["id"], f["explanation"]["text"]) for f in live), reverse=True)[:5]}
        if med_freq is None:
            freqs = sorted(f["frequency"] for f in live)
            med_freq = freqs[len(freqs) // 2]
    st = ActivationStore(store)
    tok = load_model("pycode").tokenizer
    neurons = explain_neurons(st, args.hook, med_freq, lambda t: tok.decode([t]))
    results["explained"][f"single neurons (firing rate {med_freq:.3g})"] = {
        "share_f1_ge_0.5": share_explained(neurons, 0.5), "live_scored": sum(e.heldout.fires > 0 for e in neurons)}

    from saekit import load
    from saekit.analysis.steer import SteerConfig
    from saekit.analysis.topic import topic_steer

    lm = load_model("pycode")
    for topic, pattern in TOPICS.items():
        rows = []
        for label, d in (("TopK SAE", sae), ("codebook", cb)):
            strengths = [float(x) for x in args.strengths.split(",")] if label == "TopK SAE" else [1.0, 2.0, 4.0]
            dd = load(d)
            for s in strengths:
                r = topic_steer(SteerConfig(dict=str(d), store=str(store), topic=pattern, n_features=2, strength=s,
                                            n_prompts=args.n_prompts, samples=args.samples, max_new_tokens=32),
                                model=lm, dictionary=dd, store=st)
                rows.append({"dictionary": label, "strength": s, "steered": r.steered_rate, "unsteered": r.unsteered_rate,
                             "features": [f"{f.id} (F1 {f.f1:.2f})" for f in r.features], "example": r.examples[:1]})
                print(f"  {topic}: {label} strength {s:g}: {r.steered_rate:.1%} vs {r.unsteered_rate:.1%}", flush=True)
        results["topics"][topic] = {"pattern": pattern, "runs": rows}
    results["seconds"] = time.time() - t0
    (work / "results.json").write_text(json.dumps(results, indent=2))

    print("\nShare of live features whose token-rule explanation reaches held-out F1 >= 0.5")
    for name, r in results["explained"].items():
        print(f"  {name:40s} {r['share_f1_ge_0.5']:.1%}  ({r['live_scored']} scored)")
    print("\nTopic steering: share of continuations on topic (steered vs unsteered)")
    for topic, t in results["topics"].items():
        for r in t["runs"]:
            print(f"  {topic:22s} {r['dictionary']:9s} strength {r['strength']:<4g} {r['steered']:6.1%} vs {r['unsteered']:6.1%}  features {', '.join(r['features'])}")
    print(f"\n{results['seconds'] / 60:.1f} min; {work / 'results.json'}")


if __name__ == "__main__":
    main()
