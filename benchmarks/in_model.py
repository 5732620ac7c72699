"""In-model training on the toy model: offline vs end-to-end vs jointly trained codebooks at equal L0.

    python benchmarks/in_model.py --model toy --work /tmp/in_model [--steps 300] [--hook blocks.1.hook_mlp_out]

For one hook and one codebook shape (codes, k), it trains
  offline  — `saekit.train` on a store of the original model's activations,
  e2e      — `saekit.e2e`: the same codebook shape through the frozen model against KL(clean ‖ spliced),
  joint    — `saekit.finetune`: codebook and model trained together (Codebook Features),
and reports for each: held-out CE with the codebook spliced in, loss recovered (vs zero
ablation), next-token accuracy, transition accuracy of sampled walks (the FSM's own
measure) and state-recovery F1 (`toy eval`; the joint codebook is scored on a store of
the fine-tuned model).  Every codebook has L0 = k per token by construction.  Prints a
table and writes <work>/in_model.json.  CPU: a few minutes at the defaults.
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
    from saekit import finetune as ft

    g = torch.Generator().manual_seed(seed)
    t = torch.full((n_seq, 1), bos_id, dtype=torch.long)
    with torch.no_grad():
        for _ in range(ctx - 1):
            logits = ft._forward(hf, t, bos_id, splicer, layers, skip_bos=True)
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
    ap.add_argument("--sample-seqs", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)

    from saekit import finetune as ft, metrics
    from saekit.dictionaries import load
    from saekit.e2e import E2EConfig, train_e2e
    from saekit.harvest import HarvestConfig, harvest
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

    t0 = time.time()
    offline_root = work / "offline"
    if not offline_root.exists():
        train(TrainConfig(store=str(store), hooks=[args.hook], out=str(offline_root), kind="codebook", d_dict=args.codes,
                          k=[args.k], tokens=args.steps * 8 * (ctx - 1), batch_size=8 * (ctx - 1), eval_tokens=20000), progress=False)
    [offline] = [p.parent for p in offline_root.rglob("config.json")]
    times["offline"] = time.time() - t0

    t0 = time.time()
    e2e_root = work / "e2e"
    [e2e] = train_e2e(E2EConfig(model=args.model, hooks=[args.hook], store=str(store), out=str(e2e_root), kind="codebook",
                                d_dict=args.codes, k=args.k, steps=args.steps, lr=1e-3, batch_size=8, resume=True), progress=False)
    times["e2e"] = time.time() - t0

    t0 = time.time()
    ft_out = work / "joint"
    res = ft.finetune(ft.FinetuneConfig(model=args.model, data=str(text), codebooks=spec, out=str(ft_out), steps=args.steps,
                                        batch_size=8, seq_len=ctx, packing="doc", resume=True), progress=False)
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
    for name, model, dict_dir, eval_store in [("offline", args.model, offline, store), ("e2e", args.model, e2e, store),
                                              ("joint", str(res.model), joint, store_ft)]:
        im = ft.load_in_model(model, [args.hook], torch.device("cpu"))
        sp = ft.Splicer(im.hf, list(im.sites.values()))
        d = load(dict_dir)
        layer = {args.hook: ft.InModelCodebook(d)}
        clean = ft.lm_score(im.hf, toks, im.bos_id, 16)
        spliced = ft.lm_score(im.hf, toks, im.bos_id, 16, sp, layer, True)
        zero = _zero_ablated(im, sp, args.hook, toks)
        walks_clean = sample_walks(im.hf, sp, None, im.bos_id, args.sample_seqs, ctx, seed=1)
        walks = sample_walks(im.hf, sp, layer, im.bos_id, args.sample_seqs, ctx, seed=1)
        rec = state_recovery([str(dict_dir)], str(eval_store))
        rows[name] = {
            "ce_clean": clean.loss, "ce_spliced": spliced.loss, "ce_zero": zero,
            "loss_recovered": metrics.loss_recovered(clean.loss, spliced.loss, zero),
            "acc_clean": clean.accuracy, "acc_spliced": spliced.accuracy,
            "transition_acc_model": transition_accuracy(fsm, walks_clean)[0],
            "transition_acc_spliced": transition_accuracy(fsm, walks)[0],
            "state_f1": rec.dicts[0].scores.mean_best_f1, "neuron_f1": rec.neurons.mean_best_f1, "l0": args.k,
        }
    out = {"model": args.model, "hook": args.hook, "codes": args.codes, "k": args.k, "steps": args.steps,
           "finetune_table": res.table, "rows": rows, "seconds": times}
    (work / "in_model.json").write_text(json.dumps(out, indent=2))
    print(f"hook {args.hook}, {args.codes} codes, k={args.k} (L0={args.k}), {args.steps} steps")
    print(f"{'':8} {'CE clean':>9} {'CE spliced':>10} {'loss rec.':>9} {'acc':>6} {'trans. acc model/spliced':>25} {'state F1':>8}")
    for name, r in rows.items():
        print(f"{name:8} {r['ce_clean']:9.4f} {r['ce_spliced']:10.4f} {r['loss_recovered']:9.3f} {r['acc_spliced']:6.3f} "
              f"{r['transition_acc_model']:12.3f} / {r['transition_acc_spliced']:.3f} {r['state_f1']:9.3f}")
    for row in res.table:
        print(f"  finetune table: {row['model']:36} loss {row['loss']:.4f}  acc {row['accuracy']:.3f}")
    print("seconds:", {k: round(v) for k, v in times.items()})


def _zero_ablated(im, sp, hook: str, toks: np.ndarray) -> float:
    from saekit import finetune as ft, metrics

    ce = n = 0.0
    with torch.no_grad():
        for i in range(0, toks.shape[0], 16):
            t = torch.as_tensor(toks[i:i + 16], dtype=torch.long)
            mask = ft.splice_mask(t, True)

            def zero(x):
                out = x.clone()
                out[mask] = 0
                return out

            with sp.active({hook: zero}):
                logits = im.hf(input_ids=ft.model_input(t, im.bos_id)).logits
            m = ft.scored_mask(t)
            ce += (metrics.ce_per_token(logits, ft.model_input(t, im.bos_id)) * m).sum().item()
            n += m.sum().item()
    return ce / max(n, 1)


if __name__ == "__main__":
    main()
