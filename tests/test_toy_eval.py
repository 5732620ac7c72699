"""`toy eval`: best-F1 state recovery, checked against scikit-learn and a direct re-computation on a real store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from saekit.errors import SaekitError
from saekit.toy.eval import Counts, best_f1, neuron_scores, score_codes


def test_best_f1_matches_sklearn_on_synthetic_codes():
    rng = np.random.default_rng(0)
    n_tok, n_states, n_feat = 3000, 6, 10
    state = np.where(rng.random(n_tok) < 0.5, rng.integers(0, n_states, n_tok), -1)  # −1: no state completed
    codes = np.zeros((n_tok, n_feat), dtype=np.float32)
    for s in range(n_states):  # feature s detects state s, with misses and false alarms that grow with s
        hit = state == s
        codes[:, s] = (hit & (rng.random(n_tok) > 0.1 * s)) | (~hit & (rng.random(n_tok) < 0.01 * s))
    codes[:, n_states:] = rng.random((n_tok, n_feat - n_states)) < 0.3
    codes[:, n_feat - 1] = 0  # a dead feature
    batches = [(torch.from_numpy(codes[i : i + 700] * 2.5), torch.from_numpy(state[i : i + 700])) for i in range(0, n_tok, 700)]
    sc = score_codes(batches, n_feat, n_states)

    for s in range(n_states):
        y = state == s
        f1s = [f1_score(y, codes[:, f] != 0, zero_division=0) for f in range(n_feat)]
        best = int(np.argmax(f1s))
        assert sc.best_feature[s] == best == s
        assert sc.f1[s] == pytest.approx(f1s[best], abs=1e-12)
        assert sc.precision[s] == pytest.approx(precision_score(y, codes[:, best] != 0), abs=1e-12)
        assert sc.recall[s] == pytest.approx(recall_score(y, codes[:, best] != 0), abs=1e-12)
        assert sc.n_positive[s] == y.sum()
    assert sc.mean_best_f1 == pytest.approx(np.mean(sc.f1))
    assert sc.share_f1_ge == pytest.approx(np.mean(sc.f1 >= 0.9))
    assert 0 < sc.share_f1_ge < 1  # the synthetic detectors straddle the 0.9 line


def test_states_never_seen_are_left_out_of_the_means():
    tp = torch.tensor([[4.0, 0.0, 0.0]])
    sc = best_f1(tp, torch.tensor([4.0]), torch.tensor([4.0, 2.0, 0.0]))
    assert sc.present.tolist() == [True, True, False]
    assert sc.mean_best_f1 == pytest.approx(0.5) and sc.share_f1_ge == pytest.approx(0.5)


def test_neuron_below_direction_is_the_complement():
    rng = np.random.default_rng(1)
    acts = torch.from_numpy(rng.normal(size=(500, 3)).astype(np.float32))
    state = torch.from_numpy(np.where(acts[:, 1].numpy() < -1.0, 0, -1))  # state 0 ⇔ neuron 1 is low
    thr = torch.tensor([[-1.0, -1.0, -1.0]])
    c = Counts.zeros(3, 1)
    c.update(acts > thr, state)
    sc = neuron_scores(c)
    assert sc.best_feature[0] == 3 + 1  # the "below" copy of neuron 1
    assert sc.f1[0] == pytest.approx(1.0)


# --- on a real store ---------------------------------------------------------------------------------

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    """A tiny toy model, its corpus and labels, and a --packing doc store of one hook (half held out)."""
    from saekit.harvest import HarvestConfig, harvest
    from saekit.toy.corpus import ToyDataConfig, write_corpus
    from saekit.toy.train import ToyTrainConfig, train_toy
    from saekit.config import from_flags

    root = tmp_path_factory.mktemp("toyeval")
    model, _ = train_toy(from_flags(ToyTrainConfig, 
        out=str(root / "model"), n_states=12, out_degree=3, digits=2, ctx=24, n_layer=1, d_model=32, n_head=2, d_mlp=64,
        batch_size=16, steps=30, lr=1e-2, warmup=10, eval_every=0, eval_seqs=8, threads=1,
    ))
    text, labels, seq_len = write_corpus(ToyDataConfig(out=str(root / "toy.txt"), n_seq=60, model=str(model)))
    assert seq_len == 24 and all(len(line) == 23 for line in text.read_text().splitlines())
    store = harvest(HarvestConfig(model=str(model), hooks=[HOOK], data=str(text), packing="doc", context_size=24,
                                  out=str(root / "store"), holdout=0.5), progress=False)
    return root, model, labels, store


def _oracle_codebook(store_path, out, hook=HOOK):
    """A codebook whose codes are the mean activation of each "state s just completed" class (+ one for the rest)."""
    from saekit.dictionaries.base import DictConfig, Provenance
    from saekit.dictionaries.codebook import Codebook
    from saekit.store import ActivationStore
    from saekit.toy.fsm import labels_from_tokens, load_fsm

    st = ActivationStore(store_path)
    fsm = load_fsm(st.model.name)
    r = st.split("train")
    tokens, acts = st.read_tokens(r.start, r.stop), st.read_acts(hook, r.start, r.stop)
    lab = labels_from_tokens(fsm, tokens)
    mask = st.row_mask(tokens)
    cls = np.where(lab.complete, lab.state, fsm.n_states)[mask]
    x = acts[mask]
    centres = np.stack([x[cls == c].mean(0) if (cls == c).any() else np.zeros(x.shape[1]) for c in range(fsm.n_states + 1)])
    d = Codebook(DictConfig(kind="codebook", d_in=x.shape[1], d_dict=fsm.n_states + 1, k=1),
                 Provenance(hook=hook, model=st.model.to_dict(), scale=1.0, store=str(store_path)))
    with torch.no_grad():
        d.codebook.copy_(torch.from_numpy(centres).float()[None])
    d.save(out)
    return out


def test_state_recovery_agrees_with_a_direct_count_from_the_labels_file(toy_store, tmp_path):
    from saekit import load
    from saekit.store import ActivationStore
    from saekit.toy.eval import state_recovery
    from saekit.toy.fsm import load_labels

    root, model, labels_file, store = toy_store
    dpath = _oracle_codebook(store, tmp_path / "oracle")
    res = state_recovery([str(dpath)], str(store))

    # Independent route: ground truth from the generator's labels file, codes from a direct encode.
    fsm, tokens, lab = load_labels(labels_file)
    st = ActivationStore(store)
    r = st.split("eval")
    stored = st.read_tokens(r.start, r.stop)
    assert (stored == tokens[r.start : r.stop]).all()  # store sequence i is corpus line i
    mask = st.row_mask(stored)
    y_state = np.where(lab.complete[r.start : r.stop], lab.state[r.start : r.stop], -1)[mask]
    with torch.no_grad():
        codes = load(dpath).encode(torch.from_numpy(st.read_acts(HOOK, r.start, r.stop)[mask])).numpy() != 0
    assert res.n_tokens == mask.sum()
    for s in range(fsm.n_states):
        y = y_state == s
        if not y.any():
            assert not res.combined.present[s]
            continue
        best = max(f1_score(y, codes[:, f], zero_division=0) for f in range(codes.shape[1]))
        assert res.combined.f1[s] == pytest.approx(best, abs=1e-12)
    # The oracle codes find the states better than chance; the JSON carries the promised keys.
    d = res.to_dict()
    for key in ("mean_best_f1", "share_states_f1_ge_0.9", "neuron_mean_best_f1"):
        assert 0.0 <= d[key] <= 1.0
    assert d["mean_best_f1"] > 0.5
    assert d["dictionaries"][0]["hook"] == HOOK and len(d["per_state"]) == fsm.n_states


def test_neuron_baseline_matches_a_brute_force_search(toy_store, tmp_path):
    from saekit.store import ActivationStore
    from saekit.toy.eval import QUANTILES, _thresholds, state_recovery
    from saekit.toy.fsm import labels_from_tokens, load_fsm

    root, model, labels_file, store = toy_store
    res = state_recovery([str(_oracle_codebook(store, tmp_path / "oracle"))], str(store))
    st = ActivationStore(store)
    fsm = load_fsm(str(model))
    r = st.split("eval")
    tokens = st.read_tokens(r.start, r.stop)
    mask = st.row_mask(tokens)
    lab = labels_from_tokens(fsm, tokens)
    y_state = np.where(lab.complete, lab.state, -1)[mask]
    a = st.read_acts(HOOK, r.start, r.stop)[mask]
    thr = _thresholds(st, HOOK).numpy()
    assert thr.shape == (len(QUANTILES), a.shape[1])
    for s in np.unique(y_state[y_state >= 0])[:4]:
        y = y_state == s
        best = 0.0
        for q in range(thr.shape[0]):
            above = a > thr[q]
            for fired in (above, ~above):
                tp = (fired & y[:, None]).sum(0)
                best = max(best, float((2 * tp / (fired.sum(0) + y.sum())).max()))
        assert res.neurons.f1[s] == pytest.approx(best, abs=1e-12)


def test_eval_refuses_a_dictionary_for_another_hook(toy_store, tmp_path):
    from saekit.toy.eval import state_recovery

    root, model, labels_file, store = toy_store
    d = _oracle_codebook(store, tmp_path / "oracle")
    cfg = json.loads((d / "config.json").read_text())
    cfg["provenance"]["hook"] = "blocks.0.hook_mlp_out"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SaekitError, match="blocks.0.hook_mlp_out.*does not hold"):
        state_recovery([str(d)], str(store))


def test_eval_refuses_a_store_not_made_from_toy_data(tiny_model_dir, tiny_text_file, tmp_path):
    from saekit.harvest import HarvestConfig, harvest
    from saekit.toy.eval import state_recovery

    store = harvest(HarvestConfig(model=tiny_model_dir, hooks=[HOOK], data=tiny_text_file, packing="doc", context_size=16,
                                  tokens=2000, out=str(tmp_path / "store")), progress=False)
    d = _oracle_codebook_stub(tmp_path / "d", 32)
    with pytest.raises(SaekitError, match="not a toy model"):
        state_recovery([str(d)], str(store))
    # Forcing an FSM on it through a labels file does not help: its tokens are not FSM walks.
    from saekit.toy.fsm import FSM, generate, save_labels

    fsm = FSM.random(12, 3, 2)
    labels = save_labels(tmp_path / "l.safetensors", *generate(fsm, 2, 8), fsm)
    with pytest.raises(SaekitError, match="toy BOS"):
        state_recovery([str(d)], str(store), labels=str(labels))


def test_eval_refuses_a_store_packed_with_concat(toy_store, tmp_path):
    import shutil

    from saekit.toy.eval import state_recovery

    root, model, labels_file, store = toy_store
    d = _oracle_codebook(store, tmp_path / "oracle")
    copy = shutil.copytree(store, tmp_path / "store")
    m = json.loads((copy / "manifest.json").read_text())
    m["text"]["packing"] = "concat"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SaekitError, match="--packing doc"):
        state_recovery([str(d)], str(copy))


def _oracle_codebook_stub(out, d_in):
    from saekit.dictionaries.base import DictConfig, Provenance
    from saekit.dictionaries.codebook import Codebook

    Codebook(DictConfig(kind="codebook", d_in=d_in, d_dict=4, k=1), Provenance(hook=HOOK)).save(out)
    return out


def test_cli_data_and_eval(toy_store, tmp_path):
    from typer.testing import CliRunner

    from saekit_cli.main import app

    root, model, labels_file, store = toy_store
    runner = CliRunner()
    out = tmp_path / "c.txt"
    r = runner.invoke(app, ["toy", "data", "--out", str(out), "--n-seq", "5", "--seq-len", "11", "--seed", "3", "--model", str(model)])
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and all(len(x) == 10 and x.isdigit() for x in lines)
    assert (tmp_path / "c.labels.safetensors").is_file()

    d = _oracle_codebook(store, tmp_path / "oracle")
    js = tmp_path / "r.json"
    r = runner.invoke(app, ["toy", "eval", "--dict", str(d), "--store", str(store), "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "best single neuron" in r.output
    assert {"mean_best_f1", "share_states_f1_ge_0.9", "neuron_mean_best_f1"} <= set(json.loads(js.read_text()))
