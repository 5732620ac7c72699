"""Write the four analysis notebooks (outputs cleared) from the cell sources below.

Run `python notebooks/build.py` after editing a cell here; the .ipynb files are what users
open and what tests/test_notebooks.py executes.  Keeping the sources in one Python file
makes their diffs readable.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

SETUP = '''\
import os, tempfile
from pathlib import Path

MODEL = os.environ.get("SAEKIT_NOTEBOOK_MODEL", "toy")  # the built-in toy model (set the variable to try another toy model)
WORK = Path(tempfile.mkdtemp(prefix="saekit-notebook-"))  # everything this notebook writes goes here
print("model:", MODEL, "| writing to", WORK)'''

PIPELINE = '''\
from saekit.pipeline import PipelineConfig, run_pipeline

# Small on purpose: the notebook should run in a minute or two on a laptop CPU.
result = run_pipeline(PipelineConfig(model=MODEL, out=str(WORK), n_seq=400, train_tokens=150_000, expansion=4, k=4, codes=128),
                      progress=False, say=print)
store_dir = result.store
sae_dir, codebook_dir = [str(p) for p in result.dictionaries]
print("store:", store_dir)
print("SAE:", sae_dir)
print("codebook:", codebook_dir)'''


def nb(cells):
    out = new_notebook()
    out.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out.metadata["language_info"] = {"name": "python"}
    out.cells = [new_markdown_cell(c[3:]) if c.startswith("md:") else new_code_cell(c) for c in cells]
    return out


QUICKSTART = [
    """md:# saekit quickstart: harvest → train → splice-eval, from Python

The three stages meet only through folders on disk, so each can be rerun or inspected on
its own.  We use the built-in toy model (a small GPT-2 trained on walks through a random
finite-state machine, `MODEL = "toy"`) so everything runs on a CPU in a couple of minutes.
The command-line equivalents are `saekit harvest`, `saekit train`, `saekit splice-eval`.""",
    SETUP,
    """md:## 0. Text
The toy model reads digit strings: each state of the FSM is written as two digits.
`saekit toy data` (here `write_corpus`) samples walks, one sequence a line, with their
ground-truth states saved beside them.""",
    '''\
from saekit.toy.corpus import ToyDataConfig, write_corpus

corpus, labels, seq_len = write_corpus(ToyDataConfig(out=str(WORK / "toy.txt"), n_seq=400, model=MODEL))
print(corpus.read_text().splitlines()[0][:60], "...", f"({seq_len} tokens per sequence with BOS)")''',
    """md:## 1. Harvest
Run the frozen model over the text and store one hook's activations (HDF5 shards + a
manifest).  `packing="doc"` keeps one walk per sequence so positions line up with states.""",
    '''\
from saekit.harvest import HarvestConfig, harvest
from saekit.pipeline import default_hook
from saekit.store import ActivationStore

HOOK = default_hook(MODEL)  # the residual stream after the middle block
store_dir = harvest(HarvestConfig(model=MODEL, hooks=[HOOK], data=str(corpus), packing="doc", context_size=seq_len,
                                  out=str(WORK / "store")), progress=False)
store = ActivationStore(store_dir)
print(store)
print("hook", HOOK, "width", store.hook_width(HOOK), "| tokens", store.n_tokens, "| sequences", store.n_sequences)''',
    """md:## 2. Train
A TopK SAE (k = 4 active latents per token, 4× as many latents as the hook is wide) and a
k-sparse codebook (one code per token out of 128), as in Codebook Features.  Each lands in
its own folder: `config.json` + `weights.safetensors`.""",
    '''\
from saekit.train import TrainConfig, train
from saekit.config import from_flags

common = dict(store=str(store_dir), hooks=[HOOK], out=str(WORK / "dicts"), tokens=150_000)
sae_dir, = train(from_flags(TrainConfig, kind="topk", k=[4], expansion=4, **common), progress=False)
codebook_dir, = train(from_flags(TrainConfig, kind="codebook", k=[1], d_dict=128, **common), progress=False)
print(sae_dir, codebook_dir, sep="\\n")''',
    '''\
import saekit, torch

sae = saekit.load(sae_dir)
x = torch.from_numpy(store.read_acts(HOOK, 0, 2)).reshape(-1, store.hook_width(HOOK))
out = sae(x)  # ForwardOutput(x_hat, codes)
from saekit import metrics
print(f"L0 = {metrics.l0(out.codes):.2f} active latents per token, FVU = {metrics.fvu(x, out.x_hat):.3f}")''',
    """md:## 3. Splice-eval
Put each dictionary's reconstruction back into the model in place of the activation and
measure the next-token loss: *loss recovered* is 1 when nothing is lost and 0 when the
splice is as bad as zero-ablating the hook.""",
    '''\
from saekit.splice import SpliceConfig, splice_eval

res = splice_eval(SpliceConfig(model=MODEL, dicts=[str(sae_dir), str(codebook_dir)], store=str(store_dir), max_tokens=8192))
for row in res["dictionaries"]:
    print(f"{row['dict']:40s} CE clean {row['ce_clean']:.3f} spliced {row['ce_spliced']:.3f} "
          f"loss recovered (zero-abl.) {row['loss_recovered_zero']:.1%}  L0 {row['l0']:.1f}")''',
    """md:Next: `02_reading_features` (what the latents mean), `03_fsm_codebooks` (ground-truth
states and interventions), `04_steering`.""",
]

READING = [
    """md:# Reading features: statistics, top contexts, logit effects, the dashboard

`saekit analyze` reads the store once through a dictionary and records, for every
feature, how often it fires, its activation histogram, its top activating contexts and the
tokens its decoder direction promotes through the unembedding.  Here we build a store and
two dictionaries with the one-call pipeline first.""",
    SETUP,
    PIPELINE,
    '''\
from saekit.analysis.analyze import AnalyzeConfig, analyze, load_analysis

out = analyze(AnalyzeConfig(dict=sae_dir, store=str(store_dir), out=str(WORK / "analysis-sae"), top_n=8, window=6))
a = load_analysis(out)  # features.json + stats.safetensors (no pickle)
print(len(a.meta["features"]), "features,", len(a.meta["dead"]), "dead,", len(a.meta["dense"]), "dense; files:",
      sorted(p.name for p in out.iterdir()))''',
    """md:The most frequent features, with the context where each fires hardest (the firing token
in `[[ ]]`) and the tokens it promotes.  Token 10 (`<|endoftext|>`) is BOS.""",
    '''\
feats = sorted(a.meta["features"], key=lambda f: -f["frequency"])[:8]
V = a.meta["vocab"]
for f in feats:
    promotes = " ".join(V[str(t)] for t, _ in f.get("promotes", [])[:5])
    print(f"{f['id']:>6}  freq {f['frequency']:.3f}  max {f['max']:.2f}  promotes [{promotes}]  ", a.context_text(f["id"]) if f["contexts"] else "")''',
    """md:The feature-density plot: a histogram of log10 firing frequency over all features.""",
    '''\
from IPython.display import Image
Image(filename=str(out / "density.png"))''',
    """md:The dashboard is one offline HTML file (`dashboard.html` in the analysis folder): sort
by frequency, search by id or token, click a feature to see its contexts (firing token
highlighted by strength), histogram and logit effects.""",
    '''\
from saekit.analysis.dashboard import show
show(out, height=560)''',
    """md:The same for the codebook: ids are `layer.group.code`, as in the Codebook Features paper.""",
    '''\
cb = load_analysis(analyze(AnalyzeConfig(dict=codebook_dir, store=str(store_dir), out=str(WORK / "analysis-codebook"), top_n=8)))
live = [f for f in cb.meta["features"] if f["count"]]
print(len(live), "codes used of", cb.meta["d_dict"])
for f in sorted(live, key=lambda f: -f["frequency"])[:5]:
    print(f["id"], f"{f['frequency']:.3f}", cb.context_text(f["id"]))''',
]

FSM = [
    """md:# Codebooks on the FSM task: state recovery and code interventions

The toy model was trained on walks through a random finite-state machine (after the
TokFSM task of Codebook Features).  Every token's state is known, so we can ask two
questions with ground truth:

1. **State recovery**: is there a code (or feature) that fires exactly on one state?
2. **Interventions**: if we patch the codes of state B into an input that is in state A,
   does the model continue as if in B?""",
    SETUP,
    '''\
from saekit.models import load_model
from saekit.toy.fsm import load_fsm

lm = load_model(MODEL)
fsm = load_fsm(MODEL)
n_layers = lm.info.n_layers
HOOKS = [f"blocks.{l}.hook_resid_post" for l in range(n_layers)]
print(f"{n_layers} layers; FSM with {fsm.n_states} states, {fsm.out_degree} successors each, {fsm.digits} digits per state")''',
    """md:Harvest the residual stream after every block and train one codebook per layer
(one code per token, 128 codes), all from one read of the store.""",
    '''\
from saekit.harvest import HarvestConfig, harvest
from saekit.toy.corpus import ToyDataConfig, write_corpus
from saekit.train import TrainConfig, train
from saekit.config import from_flags

corpus, _, seq_len = write_corpus(ToyDataConfig(out=str(WORK / "toy.txt"), n_seq=400, model=MODEL))
store_dir = harvest(HarvestConfig(model=MODEL, hooks=HOOKS, data=str(corpus), packing="doc", context_size=seq_len,
                                  out=str(WORK / "store")), progress=False)
codebooks = train(from_flags(TrainConfig, kind="codebook", k=[1], d_dict=128, store=str(store_dir), hooks=HOOKS, out=str(WORK / "dicts"),
                              tokens=150_000), progress=False)
codebooks = sorted(codebooks, key=lambda p: str(p))
print(*codebooks, sep="\\n")''',
    """md:## State recovery
For each state, the best single code by F1 (fires ⇔ the token belongs to that state),
against the best thresholded neuron of the raw activations as a baseline.""",
    '''\
from saekit.toy.eval import state_recovery

rec = state_recovery([str(p) for p in codebooks], str(store_dir)).to_dict()
for d in rec["dictionaries"]:
    print(f"{d['hook']:28s} mean best F1 over states {d['mean_best_f1']:.2f}, states with F1 >= 0.9: {d['share_states_f1_ge_0.9']:.0%}")
print(f"{'all layers together':28s} mean best F1 {rec['mean_best_f1']:.2f}  |  best single neuron baseline {rec['neuron_mean_best_f1']:.2f}")
for s in rec["per_state"][:5]:
    print(f"  state {s['state']:2d}: code {s['feature']} F1 {s['f1']:.2f} (precision {s['precision']:.2f}, recall {s['recall']:.2f})")''',
    """md:## Interventions
Pairs of walks ending in states A and B.  At the chosen layers, the codes at the positions
of A's last state are replaced by B's (`error="keep"` keeps the part of A's activation the
codebook does not explain; `"drop"` uses B's reconstruction alone).  Success = the model's
next state is a successor of B and not of A; JS = divergence from B's clean next-token
distribution.  Clean A is the floor, clean B the ceiling.""",
    '''\
from saekit import load
from saekit.analysis.intervene import intervene, make_pairs

dicts = [load(p) for p in codebooks]
pairs = make_pairs(fsm, 64, n_states=4, seed=0)
rows = []
for layers in [[l] for l in range(n_layers)] + [list(range(n_layers))]:
    for error in ("keep", "drop"):
        r = intervene(lm, dicts, fsm, layers, pairs=pairs, error=error)
        rows.append(r)
        print(f"layers {str(r.layers):8s} error={error:4s}  state success {r.success_rate:6.1%}  next-token success "
              f"{r.token_success_rate:6.1%}  JS {r.js:.3f}   (clean A: {r.clean_a_success:.0%}, {r.clean_a_token_success:.0%}, "
              f"JS {r.clean_a_js:.3f}; clean B: {r.clean_b_success:.0%}, {r.clean_b_token_success:.0%})")''',
    """md:Read the columns together: JS near 0 and a next-token success near clean B's mean the
patched codes carry B's state into the next prediction.  The state-level rate also needs
the *second* digit right; it is predicted at a new, unpatched position whose attention in
the layers below the patch still reads A's own tokens, so it stays lower unless the patch
also reaches that path.""",
    """md:## The paper's setting: a model trained with its codebooks (`toy-codebooks`)
Codebook Features trains the codebooks *inside* the model: every attention head's output and every
MLP output is replaced by one of 1,000 codes (k = 1) while the model trains on.  saekit ships the toy
trained that way for 3,000 steps (`saekit finetune --preset paper`, see
`saekit/toy/pretrained_codebooks/README.md`).  `CodebookModel` runs it with all its codebooks active;
the paper's tables score each state's best code at matched recall against the best neuron of all sites
(here on a few walks, to stay quick).""",
    '''\
from saekit.analysis.codebook_model import CodebookModel
from saekit.toy.eval import paper_tables

cbm = CodebookModel.load("toy-codebooks")
paper_fsm = load_fsm(cbm.path)
tables = paper_tables(cbm, paper_fsm, n_seq=32, sample_seqs=8).to_dict()
s = tables["summary"]
print(f"best code per state: precision {s['mean_code_precision_at_matched_recall']:.3f} at matched recall, "
      f"best neuron {s['mean_neuron_precision_at_matched_recall']:.3f}")
print(f"transition accuracy with codebooks {s['transition_accuracy']:.1%}, without {s['transition_accuracy_no_codebooks']:.1%}")''',
    """md:The paper's intervention on this model: B's code ids written into A's codes.  Written at A's last
state only (`state`), the next-token distribution becomes B's but the state rarely follows: at the new
position, layer 0's attention reads A's digits from the token embeddings, which no codebook covers.
Written at the new positions too (`generated`), one layer-0 site is enough.  Pairs are drawn with
`disjoint=True`: A and B share no successor, so every next state is decidably B's or A's (otherwise a
successor of both counts as a failure even for clean B).""",
    '''\
from saekit.analysis.intervene import codebook_intervention

for positions, patch in (("state", ["all"]), ("generated", ["attn[0]", "mlp[0]", "mlp[1]"])):
    r = codebook_intervention(cbm, paper_fsm, patch, n_pairs=32, n_states=4, positions=positions, seed=1, disjoint=True)
    for row in r.rows:
        print(f"{positions:9s} {row.name:7s} next state follows B in {row.success_rate:5.1%} of pairs "
              f"(clean B: {r.clean_b.success_rate:.0%}); normalised JS {row.js_normalised:.3f}")''',
]

STEERING = [
    """md:# Steering generations with features

`saekit steer` adds SAE features (their decoder direction × strength) or forces codebook
codes on at the dictionary's hook, at every position, and samples beside the unsteered
model with the same seed.  `--match REGEX` counts how often each generation matches — the
topic-steering metric of the Codebook Features talk.  On the toy model the "topic" is a
state: we force the code of state S on and measure how often the model then continues with
a successor of S.  (On the shipped 2-layer model, forcing one layer-0 code barely moves
this rate, while SAE directions change most generations at strength 8: the state is
spread over more than one code and position.  That is a finding the notebook measures,
not a claim it makes.)""",
    SETUP,
    PIPELINE,
    '''\
import numpy as np
from saekit import load
from saekit.analysis.analyze import AnalyzeConfig, analyze, load_analysis
from saekit.models import load_model
from saekit.store import ActivationStore
from saekit.toy.fsm import labels_from_tokens, load_fsm

lm, fsm = load_model(MODEL), load_fsm(MODEL)
codebook = load(codebook_dir)
a = load_analysis(analyze(AnalyzeConfig(dict=codebook_dir, store=str(store_dir), out=str(WORK / "analysis"), top_n=20, window=2)))''',
    """md:Pick the code whose top contexts all sit on one state (on its last digit), using the
ground-truth labels of the stored tokens.""",
    '''\
store = ActivationStore(store_dir)
labels = labels_from_tokens(fsm, store.read_tokens(0, store.n_sequences))
best = None
for f in a.meta["features"]:
    hits = [(c["seq"], c["pos"]) for c in f["contexts"]]
    if len(hits) < 10:
        continue
    states = [labels.state[s, p] for s, p in hits if labels.complete[s, p]]
    if len(states) < 10:
        continue
    top = np.bincount(states).argmax()
    purity = np.mean(np.array(states) == top)
    if best is None or purity > best[0]:
        best = (purity, f["id"], int(top))
purity, code_id, state = best
print(f"code {code_id}: {purity:.0%} of its top contexts end state {state:0{fsm.digits}d}")''',
    '''\
from saekit.analysis.steer import SteerConfig, steer

succ = "|".join(f"{s:0{fsm.digits}d}" for s in fsm.successors[state])
prompt = "".join(map(str, fsm.state_digits()[[(state + 7) % fsm.n_states]].reshape(-1)))  # a one-state prompt in another state
for strength in (1.0, 4.0, 16.0):
    res = steer(SteerConfig(dict=codebook_dir, feature=[code_id], prompt=prompt, strength=strength, samples=64,
                            max_new_tokens=fsm.digits, match=f"^({succ})", seed=0), model=lm, dictionary=codebook)
    print(f"strength {strength:4}: next state is a successor of {state:0{fsm.digits}d} in {res.steered_rate:.0%} of steered "
          f"vs {res.unsteered_rate:.0%} of unsteered generations (prompt {prompt!r})")
for u, s in list(zip(res.unsteered, res.steered))[:6]:
    print(f"  unsteered {u}   steered {s}")''',
    """md:Strength 1 sets the code's coefficient to 1, as if the codebook had chosen it; larger
values push harder.  The same with an SAE feature: add its decoder direction at increasing
strength and count how many generations change.""",
    '''\
sae = load(sae_dir)
sa = load_analysis(analyze(AnalyzeConfig(dict=sae_dir, store=str(store_dir), out=str(WORK / "analysis-sae"), top_n=20, window=2)))
fid = max(sa.meta["features"], key=lambda f: f["max"])["id"]
for strength in (0.0, 2.0, 8.0):
    r = steer(SteerConfig(dict=sae_dir, feature=[fid], prompt=prompt, strength=strength, samples=16, max_new_tokens=8, seed=0),
              model=lm, dictionary=sae)
    changed = sum(s != u for s, u in zip(r.steered, r.unsteered))
    print(f"feature {fid} strength {strength:4}: {changed}/16 generations changed; e.g. {r.steered[0]!r} vs {r.unsteered[0]!r}")''',
]

TEXT = [
    """md:# Features of real text, offline: the pycode model

saekit ships a small language model of real text that every machine has: a 2-layer GPT-2
trained by saekit on the Python standard library's own source (`--model pycode`, retrained
with `saekit pycode train`).  On it we do what the Codebook Features talk does on language:
train an SAE and a codebook on one layer, explain every feature by the token rule that best
predicts where it fires (scored on held-out text, no language model needed), print the
feature table, and steer generations towards a topic with the features that match it.""",
    """\
import json, os, tempfile
from pathlib import Path

WORK = Path(tempfile.mkdtemp(prefix="saekit-notebook-"))
from saekit.pycode import pretrained_dir

info = json.loads((pretrained_dir() / "pycode_train.json").read_text())
r = info["result"]
print(f"held-out loss {r['loss']:.3f} nats/token (bigram {r['bigram_loss']:.3f}, unigram {r['unigram_loss']:.3f}); "
      f"accuracy {r['accuracy']:.1%} (bigram {r['bigram_accuracy']:.1%})")""",
    """md:## 1. Harvest held-out source, train two dictionaries
`saekit pycode data` writes the files the model never trained on as `.jsonl`; 30% of the
stored sequences are held out again, for scoring explanations.""",
    """\
from saekit.harvest import HarvestConfig, harvest
from saekit.pycode.corpus import PyDataConfig, write_jsonl
from saekit.train import TrainConfig, train
from saekit.config import from_flags

HOOK = "blocks.1.hook_resid_post"
data, n_files = write_jsonl(PyDataConfig(out=str(WORK / "heldout.jsonl"), split="heldout", max_docs=40))
store_dir = harvest(HarvestConfig(model="pycode", data=str(data), hooks=[HOOK], tokens=40_000, holdout=0.3,
                                  out=str(WORK / "store")), progress=False)
common = dict(store=str(store_dir), hooks=[HOOK], out=str(WORK / "dicts"), tokens=120_000, seed=0)
sae_dir, = train(from_flags(TrainConfig, kind="topk", k=[16], expansion=2, **common), progress=False)
codebook_dir, = train(from_flags(TrainConfig, kind="codebook", k=[8], d_dict=256, **common), progress=False)
print(sae_dir, codebook_dir, sep="\\n")""",
    """md:## 2. The feature table
`saekit analyze` searches each feature's token rule (tokens, or a token after a given token)
on the store's train split and scores it as a detector on the eval split: precision,
recall and F1 there are the explanation's score.  Single neurons of the same layer, firing
as often as a typical feature, are the floor.""",
    """\
from IPython.display import Markdown, display
from saekit.analysis.analyze import AnalyzeConfig, analyze, load_analysis

shares = {}
for name, d in (("TopK SAE", sae_dir), ("codebook", codebook_dir)):
    out = analyze(AnalyzeConfig(dict=str(d), store=str(store_dir), out=str(WORK / ("analysis-" + name.split()[0])), logits=False))
    shares[name] = load_analysis(out).meta["explained_f1_ge_0.5"]
table = (WORK / "analysis-TopK" / "feature_table.md").read_text().splitlines()
display(Markdown("\\n".join(table[:16])))""",
    """\
import numpy as np
from saekit.analysis.explain import explain_neurons, share_explained
from saekit.models import load_model
from saekit.store import ActivationStore

meta = load_analysis(WORK / "analysis-TopK").meta
rate = float(np.median([f["frequency"] for f in meta["features"] if f["count"] > 0]))
tok = load_model("pycode").tokenizer
neurons = explain_neurons(ActivationStore(store_dir), HOOK, rate, lambda t: tok.decode([t]))
shares[f"single neurons (rate {rate:.3f})"] = share_explained(neurons, 0.5)
for k, v in shares.items():
    print(f"{k:32s} share of features explained at held-out F1 >= 0.5: {v:.1%}")""",
    """md:## 3. Topic steering
A topic is a regular expression over text.  The features whose firing best detects the
topic's tokens are switched on over held-out prompts that are off topic; we count the
continuations that are on topic, steered against unsteered (paired seeds).""",
    """\
from saekit import load
from saekit.analysis.steer import SteerConfig
from saekit.analysis.topic import topic_steer

lm, sae, store = load_model("pycode"), load(sae_dir), ActivationStore(store_dir)
for topic, pattern in {"exceptions": r"\\b(raise|except)\\b|Error\\b|Exception\\b", "tests": r"\\bassert\\w*|\\btest\\w*"}.items():
    res = topic_steer(SteerConfig(dict=str(sae_dir), store=str(store_dir), topic=pattern, n_features=2, strength=16,
                                  n_prompts=4, samples=4, max_new_tokens=24), model=lm, dictionary=sae, store=store)
    feats = ", ".join(f"{f.id} (F1 {f.f1:.2f})" for f in res.features)
    print(f"{topic}: on topic in {res.steered_rate:.0%} steered vs {res.unsteered_rate:.0%} unsteered; features {feats}")
    prompt, plain, steered = res.examples[0]
    print(f"  prompt {prompt!r}\\n  unsteered {plain!r}\\n  steered   {steered!r}")""",
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_reading_features.ipynb": READING,
    "03_fsm_codebooks.ipynb": FSM,
    "04_steering.ipynb": STEERING,
    "05_text_features.ipynb": TEXT,
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(nb(cells), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
