"""In-model training on the toy model: offline vs end-to-end vs jointly trained codebooks at equal L0.

    python benchmarks/in_model.py --model toy --work /tmp/in_model [--steps 300] [--hook blocks.1.hook_mlp_out]

For one hook and one codebook shape (codes, k), it trains
  offline      — `saekit.train` on a store of the original model's activations (same rows as e2e sees),
  offline ×M   — the same with M times the tokens (offline steps are cheap: is its gap only budget?),
  e2e          — `saekit.inmodel.e2e`: the same codebook shape through the frozen model against KL(clean ‖ spliced),
  joint        — `saekit.inmodel.finetune`: codebook and model trained together (Codebook Features),
all on the store's train split, and reports for each on the first 64 sequences of its eval
split: CE with the codebook spliced in, loss recovered against the *original* model (clean
CE and zero ablation of the original, so the joint row says how much of the original's
loss the codebook model keeps), next-token accuracy, transition accuracy of sampled walks
(the FSM's own measure, `saekit.toy.fsm.transition_accuracy`) and state-recovery F1 (`toy
eval`; the joint codebook is scored on a store of the fine-tuned model).  Every codebook
has L0 = k per token by construction.  The talk's table (original / fine-tuned without
codebooks / codebook model) comes from `saekit splice-eval --finetuned` on the same tokens,
beside the one `saekit finetune` wrote.  Prints the tables and writes <work>/in_model.json.
CPU: about ten minutes at the defaults on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def sample_walks(hf, splicer, layers, bos_id: int, n_seq: int, ctx: int, seed: int) -> np.ndarray:
    """Sample n_seq sequences from BOS at temperature 1, codebooks in `layers` active (full forward per token)."""
    from saekit.inmodel.model import spliced_logits

    g = torch.Generator().manual_seed(seed)
    t = torch.full((n_seq, 1), bos_id, dtype=torch.long)
    with torch.no_grad():
        for _ in range(ctx - 1):
            logits = spliced_logits(hf, t, bos_id, splicer, layers, skip_bos=True)
            nxt = torch.multinomial(torch.softmax(logits[:, -1].float(), -1), 1, generator=g)
            t = torch.cat([t, nxt], 1)
    return t.numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--work", default="/tmp/saekit-in-model")
    ap.add_argument("--hook", default="blocks.1.hook_mlp_out")
    ap.add_argument("--codes", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-seq", type=int, default=1200)
    ap.add_argument("--sample-seqs", type=int, default=64)
    ap.add_argument("--offline-mult", type=int, default=10, help="token multiple of the second offline row (0: no such row)")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from saekit import metrics
    from saekit.inmodel.codebooks import InModelCodebook
    from saekit.config import from_flags
    from saekit.inmodel.finetune import FinetuneConfig, finetune
    from saekit.inmodel.model import lm_score, load_in_model
    from saekit.inmodel.report import finetuned_eval
    from saekit.inmodel.sites import Splicer
    from saekit.interop import load
    from saekit.inmodel.e2e import E2EConfig, train_e2e
    from saekit.harvest import HarvestConfig, harvest
    from saekit.splice import SpliceConfig
    from saekit.toy.corpus import ToyDataConfig, write_corpus
    from saekit.toy.eval import state_recovery
    from saekit.toy.fsm import load_fsm, transition_accuracy
    from saekit.train import TrainConfig, train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    text, _, ctx = write_corpus(ToyDataConfig(out=str(work / "toy.txt"), n_seq=args.n_seq, model=args.model))
    spec = f"{args.hook}:k={args.k},codes={args.codes}"

    def store_of(model: str, name: str) -> Path:
        out = work / name
        if not (out / "manifest.json").is_file():
            harvest(HarvestConfig(model=model, hooks=[args.hook], data=str(text), context_size=ctx, packing="doc",
                                  out=str(out), holdout=0.2), progress=False)
        return out

    t0 = time.time()
    store = store_of(args.model, "store")
    times["harvest"] = time.time() - t0

    def offline_run(name: str, mult: int) -> Path:
        t0 = time.time()
        root = work / name
        if not root.exists():
            train(from_flags(TrainConfig, store=str(store), hooks=[args.hook], out=str(root), kind="codebook", d_dict=args.codes, k=[args.k],
                              tokens=mult * args.steps * 8 * (ctx - 1), batch_size=8 * (ctx - 1), eval_tokens=20000), progress=False)
        times[name] = time.time() - t0
        [folder] = [p.parent for p in root.rglob("config.json") if (p.parent / "weights.safetensors").is_file()]
        return folder

    offline = offline_run("offline", 1)
    offline_long = offline_run(f"offline-x{args.offline_mult}", args.offline_mult) if args.offline_mult else None

    t0 = time.time()
    e2e_root = work / "e2e"
    [e2e] = train_e2e(from_flags(E2EConfig, model=args.model, hooks=[args.hook], store=str(store), out=str(e2e_root), kind="codebook",
                                d_dict=args.codes, k=args.k, steps=args.steps, lr=1e-3, batch_size=8, resume=True), progress=False)
    times["e2e"] = time.time() - t0

    t0 = time.time()
    ft_out = work / "joint"
    # On the store's tokens: trained on its train split, scored on its eval split, like the other rows.
    res = finetune(from_flags(FinetuneConfig, model=args.model, store=str(store), codebooks=spec, out=str(ft_out), steps=args.steps,
                                        batch_size=8, resume=True), progress=False)
    joint = res.codebooks[0]
    times["joint"] = time.time() - t0
    store_ft = store_of(str(res.model), "store-joint")

    # Held-out CE / accuracy with each codebook spliced (offline and e2e into the original, joint into the fine-tuned model).
    from saekit.store import ActivationStore

    st = ActivationStore(store)
    ev = st.split("eval")
    toks = np.asarray(st.read_tokens(ev.start, min(ev.stop, ev.start + 64)), dtype=np.int32)
    fsm = load_fsm(args.model)
    rows = {}
    runs = [("offline", args.model, offline, store)]
    if offline_long is not None:
        runs.append((f"offline x{args.offline_mult}", args.model, offline_long, store))
    runs += [("e2e", args.model, e2e, store), ("joint", str(res.model), joint, store_ft)]
    original: dict = {}
    for name, model, dict_dir, eval_store in runs:
        im = load_in_model(model, [args.hook], torch.device("cpu"))
        sp = Splicer(im.hf, list(im.sites.values()))
        d = load(dict_dir)
        layer = {args.hook: InModelCodebook(d)}
        clean = lm_score(im.hf, toks, im.bos_id, 16)
        spliced = lm_score(im.hf, toks, im.bos_id, 16, sp, layer, True)
        zero = _zero_ablated(im, sp, args.hook, toks)
        walks_clean = sample_walks(im.hf, sp, None, im.bos_id, args.sample_seqs, ctx, seed=1)
        walks = sample_walks(im.hf, sp, layer, im.bos_id, args.sample_seqs, ctx, seed=1)
        rec = state_recovery([str(dict_dir)], str(eval_store))
        if model == args.model and not original:
            original = {"ce": clean.loss, "ce_zero": zero}
        rows[name] = {
            "ce_clean": clean.loss, "ce_spliced": spliced.loss, "ce_zero": zero,
            # Against the original model: for the joint row, how much of the original's loss the codebook model keeps.
            "loss_recovered": metrics.loss_recovered(original["ce"], spliced.loss, original["ce_zero"]),
            # Against the model the codebook is spliced into (differs from the above only for joint).
            "loss_recovered_own_model": metrics.loss_recovered(clean.loss, spliced.loss, zero),
            "acc_clean": clean.accuracy, "acc_spliced": spliced.accuracy,
            "transition_acc_model": transition_accuracy(fsm, walks_clean)[0],
            "transition_acc_spliced": transition_accuracy(fsm, walks)[0],
            "state_f1": rec.dicts[0].scores.mean_best_f1, "neuron_f1": rec.neurons.mean_best_f1, "l0": args.k,
            "dict": str(dict_dir),
        }
    t0 = time.time()
    talk = finetuned_eval(SpliceConfig(finetuned=str(ft_out)))["finetuned"]["table"]
    times["splice-eval --finetuned"] = time.time() - t0
    out = {"model": args.model, "hook": args.hook, "codes": args.codes, "k": args.k, "steps": args.steps,
           "sample_seqs": args.sample_seqs, "finetune_table": res.table, "splice_eval_finetuned_table": talk, "rows": rows,
           "seconds": times}
    (work / "in_model.json").write_text(json.dumps(out, indent=2))
    print(f"hook {args.hook}, {args.codes} codes, k={args.k} (L0={args.k}), {args.steps} steps")
    print(f"{'':12} {'CE clean':>9} {'CE spliced':>10} {'loss rec.':>9} {'acc':>6} {'trans. acc model/spliced':>25} {'state F1':>8}")
    for name, r in rows.items():
        print(f"{name:12} {r['ce_clean']:9.4f} {r['ce_spliced']:10.4f} {r['loss_recovered']:9.3f} {r['acc_spliced']:6.3f} "
              f"{r['transition_acc_model']:12.3f} / {r['transition_acc_spliced']:.3f} {r['state_f1']:9.3f}")
    print(f"neuron baseline state F1: original {rows['offline']['neuron_f1']:.3f}, fine-tuned {rows['joint']['neuron_f1']:.3f}")
    by_name = {r["model"]: r for r in talk}
    for row in res.table:
        mine = by_name.get(row["model"], {"loss": float("nan"), "accuracy": float("nan")})
        print(f"  {row['model']:36} finetune: loss {row['loss']:.4f} acc {row['accuracy']:.3f} | "
              f"splice-eval --finetuned: loss {mine['loss']:.4f} acc {mine['accuracy']:.3f}")
    print("seconds:", {k: round(v) for k, v in times.items()})


def _zero_ablated(im, sp, hook: str, toks: np.ndarray) -> float:
    from saekit import metrics
    from saekit.tokens import model_input, row_mask, scored_mask

    ce = n = 0.0
    with torch.no_grad():
        for i in range(0, toks.shape[0], 16):
            t = torch.as_tensor(toks[i:i + 16], dtype=torch.long)
            mask = row_mask(t, True)

            def zero(x):
                out = x.clone()
                out[mask] = 0
                return out

            with sp.active({hook: zero}):
                logits = im.hf(input_ids=model_input(t, im.bos_id)).logits
            m = scored_mask(t)
            ce += (metrics.ce_per_token(logits, model_input(t, im.bos_id)) * m).sum().item()
            n += m.sum().item()
    return ce / max(n, 1)


if __name__ == "__main__":
    main()
