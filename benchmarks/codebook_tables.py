"""The paper's TokFSM measures on one codebook model (a `saekit finetune --out` folder), all codebooks active.

    python benchmarks/codebook_tables.py DIR OUT.json [tables,intervene,steer] [TABLES.json]

tables: `saekit toy eval --codebook-model` (256 fresh walks, 32 sampled walks each way);
intervene: the tutorial's patchings on 100 pairs, bare state inputs and walks of 4 states, at the
final token, both digits of the last state, and (walks of 4) the last state plus generated positions;
steer: each of the 8 states whose layer-0 MLP code is most precise, that code forced on the state's
last digit of every state (as `saekit steer --codebook-model --dict --feature`), 16 paired samples
of 20 tokens after a 1-state prompt, follow rates summed; steer-state: states 0, 12, ..., 84, each
state's codes forced at all / MLP / attention codebooks (as `saekit steer --codebook-model --state`),
the same samples, beside the ceiling (the state after a prompt that IS the state, sampled 160 times).
TABLES.json reuses the tables of an earlier run (a `toy eval --json` file).  An existing OUT.json is
updated (other keys kept).  Rows: benchmarks/README.md.
"""
import json, sys, time, torch
torch.set_num_threads(1)
from saekit.analysis.codebook_model import CodebookModel
from saekit.toy.fsm import load_fsm
from saekit.toy.eval import paper_tables
from saekit.analysis.intervene import codebook_intervention
folder, out = sys.argv[1], sys.argv[2]
what = sys.argv[3].split(",") if len(sys.argv) > 3 else ["tables", "intervene", "steer"]
t0 = time.time()
cbm = CodebookModel.load(folder)
fsm = load_fsm(cbm.path)
import os
res = json.load(open(out)) if os.path.exists(out) else {}
res.update({"folder": folder, "skip_bos": cbm.skip_bos, "hooks": cbm.hooks})
if len(sys.argv) > 4:
    res["tables"] = json.load(open(sys.argv[4]))
def save():
    json.dump(res, open(out, "w"), indent=1)
if "tables" in what:
    r = paper_tables(cbm, fsm, n_seq=256, sample_seqs=32, progress=lambda s: print(f"[{time.time()-t0:.0f}s] {s}", flush=True))
    res["tables"] = r.to_dict(); save()
    print(json.dumps(res["tables"]["summary"], indent=1))
    for h in res["tables"]["hooks"]:
        print(h["hook"], "F1 %.3f prec %.3f neuron %.3f better %.2f purity %.3f / %.3f" % (h["mean_best_f1"], h["mean_code_precision"], h["mean_neuron_precision"], h["share_codes_better_than_neurons"], h["purity_states"], h["purity_state_digit"]), flush=True)
if "intervene" in what:
    for states, positions in ((1, "final"), (1, "state"), (1, "generated"), (4, "final"), (4, "state"), (4, "generated")):
        r = codebook_intervention(cbm, fsm, n_pairs=100, n_states=states, positions=positions, seed=0)
        res[f"intervene_{states}_{positions}"] = r.to_dict(); save()
        print(f"[{time.time()-t0:.0f}s] intervention states={states} positions={positions}")
        for row in (r.clean_a, *r.rows, r.clean_b):
            print(f"  {row.name:18s} JS {row.js:.4f} norm {row.js_normalised:.3f} top10 {row.top_accuracy:.3f} success {row.success_rate:.3f} of ceiling {row.success_of_ceiling:.3f} stays A {row.stays_rate:.3f}", flush=True)
if "steer" in what:
    # each state's best code at the last MLP codebook (the paper's "state codes"); steer with the 8 best, paired seeds
    from saekit.toy.steer import toy_report, tracked_code_state
    from saekit.analysis.ids import feature_id
    hook = [h for h in cbm.hooks if h.endswith("hook_mlp_out")][0]  # layer 0's MLP: later layers read it
    tab = res.get("tables") or paper_tables(cbm, fsm, n_seq=128, sample_seqs=2).to_dict()
    hk = [h for h in tab["hooks"] if h["hook"] == hook][0]
    best = sorted((p for p in hk["per_state"] if p["code"] >= 0), key=lambda p: -p["precision"])[:8]
    rows = []
    tot = {"st": [0, 0], "un": [0, 0]}
    for p in best:
        code = p["code"]
        tr = tracked_code_state(cbm, hook, code, fsm)
        slot = tr.digit if tr.digit >= 0 else fsm.digits - 1
        at = torch.tensor([q >= 1 and (q - 1) % fsm.digits == slot for q in range(64)])
        prompt = torch.tensor([[cbm.bos_id] + [int(c) for c in f"{(p['state'] + 37) % fsm.n_states:0{fsm.digits}d}"]] * 16)
        plain = cbm.sample(16, prompt.shape[1] + 20, 0, prompt=prompt)[:, prompt.shape[1]:]
        steered = cbm.sample(16, prompt.shape[1] + 20, 0, prompt=prompt, force={hook: [code]}, force_at=at)[:, prompt.shape[1]:]
        rep = toy_report(fsm, tr, prompt[0, 1:].tolist(), steered.tolist(), plain.tolist())
        rows.append({"state": p["state"], "code": feature_id(cbm.codebooks[hook], code), "precision": p["precision"], "recall": p["recall"],
                     "tracked_state": tr.state, "tracked_f1": tr.f1, "steered_follow": rep.steered_stats.follow_rate, "unsteered_follow": rep.unsteered_stats.follow_rate,
                     "steered_legal": rep.steered_stats.legal_rate, "unsteered_legal": rep.unsteered_stats.legal_rate, "n_steered": rep.steered_stats.states})
        tot["st"][0] += rep.steered_stats.follow; tot["st"][1] += rep.steered_stats.states
        tot["un"][0] += rep.unsteered_stats.follow; tot["un"][1] += rep.unsteered_stats.states
        print(f"[{time.time()-t0:.0f}s] steer {rows[-1]}", flush=True)
    res["steer"] = {"hook": hook, "rows": rows, "steered_follow": tot["st"][0] / max(tot["st"][1], 1), "unsteered_follow": tot["un"][0] / max(tot["un"][1], 1),
                    "steered_states": tot["st"][1], "unsteered_states": tot["un"][1], "chance": fsm.out_degree / fsm.n_states}
    save()
    print("steer overall", {k: v for k, v in res["steer"].items() if k != "rows"})
if "steer-state" in what:
    from saekit.analysis.codebook_model import resolve_patch_sites
    from saekit.analysis.codebook_steer import state_patches
    from saekit.toy.steer import TrackedState, toy_report
    states = list(range(0, fsm.n_states, 12))[:8]
    ss = {"states": states, "samples": 16, "new_tokens": 20}
    hit = tot = 0  # ceiling: the state sampled after BOS + S itself
    for s_ in states:
        prompt = torch.tensor([[cbm.bos_id] + [int(c) for c in f"{s_:0{fsm.digits}d}"]] * 160)
        for r in cbm.sample(160, prompt.shape[1] + fsm.digits, 0, prompt=prompt)[:, prompt.shape[1]:].tolist():
            tot += 1
            hit += all(t < 10 for t in r) and int("".join(map(str, r))) in set(fsm.successors[s_].tolist())
    ss["ceiling_follow"] = hit / tot
    print(f"[{time.time()-t0:.0f}s] steer-state ceiling {hit}/{tot} = {hit / tot:.3f}", flush=True)
    for sites, positions in (("all", "state"), ("all", "final"), ("mlp", "state"), ("attn", "state")):
        hooks = resolve_patch_sites(sites, cbm.hooks)
        tot = {"st": [0, 0, 0], "un": [0, 0, 0]}
        for s_ in states:
            prompt = torch.tensor([[cbm.bos_id] + [int(c) for c in f"{(s_ + 37) % fsm.n_states:0{fsm.digits}d}"]] * 16)
            end = prompt.shape[1] + 20
            plain = cbm.sample(16, end, 0, prompt=prompt)[:, prompt.shape[1]:]
            st = cbm.sample(16, end, 0, prompt=prompt, patches=state_patches(cbm, fsm, s_, hooks, positions))[:, prompt.shape[1]:]
            rep = toy_report(fsm, TrackedState(s_, 0, 0, 0, 1, 1, 0, fsm.digits - 1), prompt[0, 1:].tolist(), st.tolist(), plain.tolist())
            for k, w in (("st", rep.steered_stats), ("un", rep.unsteered_stats)):
                tot[k][0] += w.follow; tot[k][1] += w.states; tot[k][2] += w.legal
        row = {k: dict(follow=v[0] / max(v[1], 1), legal=v[2] / max(v[1], 1), states=v[1]) for k, v in tot.items()}
        ss[f"{sites}:{positions}"] = row
        print(f"[{time.time()-t0:.0f}s] steer-state {sites}:{positions} steered follow {row['st']['follow']:.3f} legal {row['st']['legal']:.3f} "
              f"({row['st']['states']}), unsteered follow {row['un']['follow']:.3f} legal {row['un']['legal']:.3f} ({row['un']['states']})", flush=True)
    res["steer_state"] = ss
    save()
print(f"done in {time.time()-t0:.0f}s")
