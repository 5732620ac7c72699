"""The paper's TokFSM tables: precision at matched recall, code purity, next-state accuracy, code-id interventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saekit.errors import SaekitError
from saekit.toy.eval import (
    Counts,
    best_code_at_recall,
    code_purity,
    first_transition_accuracy,
    neuron_precision_at_recall,
    next_state_logprobs,
    state_digit_inputs,
    state_inputs,
    successor_overlap,
)
from saekit.toy.fsm import BOS_ID, FSM, load_fsm

pytestmark = pytest.mark.usefixtures("one_thread")


# --- pure metrics on hand-made codes --------------------------------------------------------------


def test_best_code_at_recall_prefers_precision_above_the_recall_floor():
    # 200 tokens of state 0, 100 of state 1, 700 of none.
    state = torch.tensor([0] * 200 + [1] * 100 + [-1] * 700)
    n = len(state)
    fired = torch.zeros(n, 4, dtype=torch.bool)
    fired[:200, 0] = True  # code 0: every state-0 token ...
    fired[300:400, 0] = True  # ... and 100 others: precision 2/3, recall 1
    fired[:50, 1] = True  # code 1: a quarter of state 0, nothing else: precision 1, recall 0.25
    fired[:1, 2] = True  # code 2: one state-0 token (recall 0.005 < 1%): too rare to count
    fired[200:300, 3] = True  # code 3: exactly state 1
    c = Counts.zeros(4, 2)
    c.update(fired, state)
    m = best_code_at_recall(c.tp, c.fired, c.pos, min_recall=0.01)
    assert m.code.tolist() == [1, 3]
    assert m.precision.tolist() == pytest.approx([1.0, 1.0])
    assert m.recall.tolist() == pytest.approx([0.25, 1.0])
    # without code 1, code 0's 2/3 is the best
    m2 = best_code_at_recall(c.tp[[0, 2, 3]], c.fired[[0, 2, 3]], c.pos)
    assert m2.code[0] == 0 and m2.precision[0] == pytest.approx(2 / 3) and m2.recall[0] == pytest.approx(1.0)
    assert m.mean_precision == pytest.approx(1.0)


def test_a_state_no_code_reaches_counts_as_zero_precision():
    c = Counts.zeros(1, 2)
    c.update(torch.tensor([[True], [False], [False]]), torch.tensor([0, 1, -1]))
    m = best_code_at_recall(c.tp, c.fired, c.pos)
    assert m.code.tolist() == [0, -1]
    assert m.mean_precision == pytest.approx(0.5)  # (1 + 0) / 2


def test_neuron_precision_at_recall_matches_a_direct_count():
    rng = np.random.default_rng(0)
    n_tok, n_neu, S = 2000, 7, 3
    acts = rng.normal(size=(n_tok, n_neu)).astype(np.float32)
    state = np.where(rng.random(n_tok) < 0.3, rng.integers(0, S, n_tok), -1)
    acts[state == 1, 4] += 2.0  # neuron 4 leans towards state 1
    recall = np.array([0.5, 0.3, 0.0])
    prec, best = neuron_precision_at_recall(torch.from_numpy(acts), torch.from_numpy(state), recall)
    for s in range(2):
        on = acts[state == s]
        k = int(np.floor(recall[s] * len(on)))
        direct = []
        for j in range(n_neu):
            t = np.sort(on[:, j])[::-1][k - 1]
            direct.append((on[:, j] >= t).sum() / (acts[:, j] >= t).sum())
        assert prec[s] == pytest.approx(max(direct))
        assert best[s] == int(np.argmax(direct))
    assert best[1] == 4
    assert prec[2] == 0 and best[2] == -1  # recall 0: not scored


def test_code_purity_counts_codes_with_one_input():
    ids = torch.tensor([0, 0, 1, 2, 3])  # code 0 fires for two inputs, codes 1-3 for one each; code 4 never
    codes = torch.nn.functional.one_hot(ids, 5).float()
    share, fired = code_purity(codes)
    assert fired == 4 and share == pytest.approx(3 / 4)


def test_state_and_state_digit_inputs_are_the_tutorials_bigrams_and_trigrams():
    fsm = load_fsm("toy")
    s = state_inputs(fsm)
    assert s.shape == (fsm.n_states, 1 + fsm.digits) and (s[:, 0] == BOS_ID).all()
    t = state_digit_inputs(fsm)
    digs = fsm.state_digits()
    expected = sum(len(set(digs[fsm.successors[q], 0].tolist())) for q in range(fsm.n_states))
    assert t.shape == (expected, 2 + fsm.digits) and len({tuple(r) for r in t.tolist()}) == expected
    for row in t[:50]:
        q = row[1] * 10 + row[2]
        assert row[3] in set(digs[fsm.successors[q], 0].tolist())


def _fsm_model(fsm: FSM):
    """A perfect next-token 'model' of the FSM: uniform over the successors of the last complete state."""
    digs = fsm.state_digits()

    def run(t: torch.Tensor) -> torch.Tensor:
        n, T = t.shape
        out = torch.full((n, T, 11), -1e4)
        for i in range(n):
            for p in range(T):
                body = t[i, 1:p + 1].tolist()
                full, rem = divmod(len(body), fsm.digits)
                if full == 0:
                    cand = np.arange(fsm.n_states)
                else:
                    last = int("".join(map(str, body[(full - 1) * fsm.digits:full * fsm.digits])))
                    cand = fsm.successors[last]
                pre = body[full * fsm.digits:]
                cand = [c for c in cand if list(digs[c, :rem]) == pre]
                for c in cand:
                    out[i, p, digs[c, rem]] = 0.0
        return out

    return run


def test_next_state_probabilities_and_first_transition_of_a_perfect_model():
    fsm = load_fsm("toy")
    run = _fsm_model(fsm)
    prompts = torch.from_numpy(state_inputs(fsm)[:5])
    logp = next_state_logprobs(run, prompts, fsm)
    assert logp.exp().sum(-1).numpy() == pytest.approx(np.ones(5), abs=1e-4)
    assert successor_overlap(logp, np.arange(5), fsm) == pytest.approx(np.ones(5))
    assert first_transition_accuracy(run, fsm) == pytest.approx(1.0)
    # a model that ignores its input knows nothing: about out_degree / n_states of its top states are successors
    flat = lambda t: torch.zeros(t.shape[0], t.shape[1], 11)  # noqa: E731
    assert first_transition_accuracy(flat, fsm) < 0.3


# --- a codebook model: the forward matches finetune's, interventions reach the ceiling --------------


@pytest.fixture(scope="module")
def toy_in_model():
    from saekit.inmodel.model import load_in_model

    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out",
             "blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"]
    return load_in_model("toy", hooks, torch.device("cpu"))


def _capture(im, hooks, tokens):
    from saekit.inmodel.sites import Splicer

    got = {}

    def saver(h):
        def fn(x):
            got[h] = x.detach().clone()
            return x

        return fn

    with torch.no_grad(), Splicer(im.hf, [im.sites[h] for h in hooks]).active({h: saver(h) for h in hooks}):
        im.hf(input_ids=tokens)
    return got


def exact_codebook_model(im, fsm, inputs=None):
    """Codebooks at both layers' residual stream whose codes are the activations of every state input (or of `inputs`) (k = 1, cosine)."""
    from saekit.analysis.codebook_model import CodebookModel
    from saekit.dictionaries.base import DictConfig, Provenance
    from saekit.dictionaries.codebook import Codebook

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    acts = _capture(im, hooks, torch.from_numpy(state_inputs(fsm) if inputs is None else inputs))
    cbs = {}
    for h in hooks:
        rows = torch.unique(acts[h][:, 1:].reshape(-1, acts[h].shape[-1]), dim=0)  # positions 1.. (BOS is never replaced)
        d = Codebook(DictConfig(kind="codebook", d_in=rows.shape[1], d_dict=rows.shape[0], k=1, groups=1, similarity="cosine"),
                     Provenance(hook=h))
        with torch.no_grad():
            d.codebook.copy_(rows[None])
        cbs[h] = d
    return CodebookModel(im.hf, cbs, {h: im.sites[h] for h in im.sites}, im.bos_id, skip_bos=True, path="toy")


def identity_codebook_model(im):
    """An exact codebook model: one k = 1 codebook at layer 0's input whose codes are every (token, position) embedding.

    Whatever the input, each row's own embedding is its most similar code (cosine 1), so the
    codebook model computes exactly what the model computes.
    """
    from saekit.analysis.codebook_model import CodebookModel
    from saekit.dictionaries.base import DictConfig, Provenance
    from saekit.dictionaries.codebook import Codebook

    h = "blocks.0.hook_resid_pre"
    wte, wpe = im.hf.transformer.wte.weight.detach(), im.hf.transformer.wpe.weight.detach()
    rows = (wte[:, None, :] + wpe[None, :, :]).reshape(-1, wte.shape[1])  # (vocab·n_ctx, d_model)
    d = Codebook(DictConfig(kind="codebook", d_in=rows.shape[1], d_dict=rows.shape[0], k=1, groups=1, similarity="cosine"), Provenance(hook=h))
    with torch.no_grad():
        d.codebook.copy_(rows[None])
    return CodebookModel(im.hf, {h: d}, im.sites, im.bos_id, skip_bos=True, path="toy")


def test_codebook_model_forward_equals_finetunes_spliced_forward(toy_in_model):
    """CodebookModel.run (eval, intervene, steer) computes what finetune's training forward computes."""
    from saekit.analysis.codebook_model import CodebookModel
    from saekit.inmodel.codebooks import InModelCodebook, build_codebook, parse_spec
    from saekit.inmodel.model import spliced_logits
    from saekit.inmodel.sites import Splicer
    from saekit.toy.fsm import generate

    import inspect

    im = toy_in_model
    fsm = load_fsm("toy")
    specs = parse_spec("attn:k=1,groups=heads,codes=16;mlp:k=2,codes=32,sim=inner", 2)
    tokens = torch.from_numpy(generate(fsm, 4, 24, seed=3)[0])
    # every objective / input normalisation finetune has (the paper's LayerNorm'd input where this saekit has it)
    variants = [((), ())]
    if "objective" in inspect.signature(InModelCodebook.__init__).parameters:
        variants += [(("layernorm",), ("paper",)), ((), ("paper",))]
    for norm, objective in variants:
        torch.manual_seed(0)
        cbs = {s.hook: build_codebook(s, im.shapes[s.hook], None, *norm) for s in specs}
        for d in cbs.values():
            d.scale.fill_(0.7 if not norm else 1.0)
            if norm:
                with torch.no_grad():
                    d.ln_weight.uniform_(0.5, 1.5)
                    d.ln_bias.normal_(0, 0.1)
        cbm = CodebookModel(im.hf, cbs, {h: im.sites[h] for h in cbs}, im.bos_id, skip_bos=True)
        mine, rec = cbm.run(tokens, record=True)
        theirs = spliced_logits(im.hf, tokens, im.bos_id, Splicer(im.hf, [im.sites[h] for h in cbs]),
                                {h: InModelCodebook(d, *objective) for h, d in cbs.items()}, True)
        assert torch.allclose(mine, theirs, atol=1e-5), (norm, objective)
    plain = cbm.run(tokens, codebooks=False)[0]
    assert not torch.allclose(mine, plain, atol=1e-2)  # the codebooks do change the model
    # k codes per group at every replaced position, none at BOS
    assert (rec.codes["blocks.1.hook_mlp_out"][:, 1:].sum(-1) == 2).all() and (rec.codes["blocks.1.hook_mlp_out"][:, 0] == 0).all()
    assert (rec.codes["blocks.0.attn.hook_z"][:, 1:].sum(-1) == 4).all()  # one code in each of 4 heads


def test_intervention_on_an_exact_codebook_model_reaches_the_clean_b_ceiling(toy_in_model):
    from saekit.analysis.intervene import codebook_intervention, make_pairs

    from saekit.toy.fsm import generate

    fsm = load_fsm("toy")
    cbm = identity_codebook_model(toy_in_model)
    # exact: with its codebook the model computes what it computes without it, on any walk
    walks = torch.from_numpy(generate(fsm, 4, 40, seed=9)[0])
    assert torch.allclose(cbm.run(walks)[0], cbm.run(walks, codebooks=False)[0], atol=1e-4)

    pairs = make_pairs(fsm, 24, 1, seed=0)  # BOS + one state: B's codes on its digits make the input B's
    whole = codebook_intervention(cbm, fsm, ["all"], positions="state", pairs=pairs)
    ceil, floor, row = whole.clean_b, whole.clean_a, whole.rows[0]
    assert floor.success_rate < ceil.success_rate and floor.js > 0.05 and floor.js_normalised == pytest.approx(1.0)
    assert row.js < 1e-6 and row.js_normalised < 1e-5
    assert row.top_accuracy == pytest.approx(ceil.top_accuracy)
    assert row.success_rate == pytest.approx(ceil.success_rate)
    assert ceil.top_accuracy > 0.8 and ceil.success_rate > 0.5  # the toy model knows its FSM

    last = codebook_intervention(cbm, fsm, ["all"], positions="final", pairs=pairs)
    assert last.rows[0].js > 1e-3  # the final digit alone does not make it B: A's first digit is still read

    default = codebook_intervention(cbm, fsm, ["all"], pairs=pairs)  # the default is the whole last state
    assert default.positions == "state" and default.rows[0].success_rate == pytest.approx(ceil.success_rate)
    assert default.rows[0].success_of_ceiling == pytest.approx(1.0) and default.rows[0].stays_rate == pytest.approx(ceil.stays_rate)
    # generated: new positions get the codes they have after B's prompt; this codebook's codes (token + position) ignore the
    # prompt, so it patches nothing more than state does
    gen = codebook_intervention(cbm, fsm, ["all"], positions="generated", pairs=pairs)
    assert gen.rows[0].success_rate == pytest.approx(ceil.success_rate) and gen.rows[0].top_accuracy == pytest.approx(ceil.top_accuracy)


def test_disjoint_pairs_share_no_successor_so_every_next_state_is_decidable(toy_in_model):
    from saekit.analysis.intervene import codebook_intervention, last_states, make_pairs

    fsm = load_fsm("toy")
    valid = fsm.valid_mask()

    def shared(pairs):
        a, b = last_states(fsm, pairs[0]), last_states(fsm, pairs[1])
        return (valid[a] & valid[b]).any(1)

    assert shared(make_pairs(fsm, 200, 1, seed=0)).any()  # by default some pairs share successors: those next states are neither
    pairs = make_pairs(fsm, 24, 2, seed=0, disjoint=True)
    assert pairs[0].shape == (24, 1 + 2 * fsm.digits) and not shared(pairs).any()
    res = codebook_intervention(identity_codebook_model(toy_in_model), fsm, ["all"], n_pairs=24, n_states=2, seed=0, disjoint=True)
    assert res.disjoint and res.to_dict()["disjoint"]
    assert np.array_equal(res.clean_b.success_rate, res.rows[0].success_rate)
    # on disjoint pairs a valid next state is B's or A's, never both: clean B's valid next states all count as success
    assert res.clean_b.success_rate + res.clean_b.stays_rate <= 1.0 and res.clean_b.stays_rate < 0.1


def test_state_and_final_patching_differ_exactly_where_the_first_digits_differ(toy_in_model):
    """final writes B's code at the last digit only, state at both: they agree when A and B share their first digit."""
    from saekit.analysis.intervene import codebook_intervention, make_pairs

    fsm = load_fsm("toy")
    cbm = identity_codebook_model(toy_in_model)
    ta, tb = make_pairs(fsm, 64, 1, seed=1)
    same = ta[:, 1] == tb[:, 1]
    assert 0 < same.sum() < len(same)
    for rows, differ in ((same, False), (~same, True)):
        pairs = (ta[rows], tb[rows])
        final = codebook_intervention(cbm, fsm, ["all"], positions="final", pairs=pairs).rows[0]
        state = codebook_intervention(cbm, fsm, ["all"], positions="state", pairs=pairs).rows[0]
        assert state.js < 1e-6
        if differ:
            assert final.js > 1e-3
        else:
            assert final.js == pytest.approx(state.js, abs=1e-6) and final.success_rate == state.success_rate
            assert final.top_accuracy == pytest.approx(state.top_accuracy)


def test_generated_patching_carries_b_context_into_new_positions(toy_in_model):
    """With codes that depend on context (the residual stream after each layer), generated gives every new position the codes
    it has after B's prompt: with every codebook patched, the patched run's continuation is clean B's."""
    from saekit.analysis.intervene import codebook_intervention, make_pairs

    fsm = load_fsm("toy")
    cbm = exact_codebook_model(toy_in_model, fsm)
    pairs = make_pairs(fsm, 32, 4, seed=2)
    gen = codebook_intervention(cbm, fsm, ["all"], positions="generated", pairs=pairs)
    assert gen.rows[0].success_rate == pytest.approx(gen.clean_b.success_rate)
    assert gen.rows[0].top_accuracy == pytest.approx(gen.clean_b.top_accuracy)
    assert gen.rows[0].stays_rate == pytest.approx(gen.clean_b.stays_rate)


def test_paper_tables_on_the_exact_codebook_model(toy_in_model):
    from saekit.toy.eval import paper_tables

    fsm = load_fsm("toy")
    cbm = exact_codebook_model(toy_in_model, fsm)
    r = paper_tables(cbm, fsm, n_seq=8, ctx=24, sample_seqs=2)
    by = {h.hook: h for h in r.hooks}
    assert set(by) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    # every state input ends on its own code (the codes are those inputs' activations): all pure
    assert by["blocks.1.hook_resid_post"].purity_states == pytest.approx(1.0)
    assert r.neuron_hooks and r.n_neurons == 4 * 128
    assert 0 <= r.combined.mean_precision <= 1 and 0 <= r.first_transition <= 1
    assert r.first_transition_no_codebooks > 0.8
    d = r.to_dict()
    assert d["summary"]["n_tokens"] == r.n_tokens and len(d["combined"]["per_state"]) == fsm.n_states


def test_patch_sites_resolve_and_refuse_unknown_ones():
    from saekit.analysis.codebook_model import resolve_patch_sites

    hooks = ["blocks.0.attn.hook_z", "blocks.0.hook_mlp_out", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]
    assert resolve_patch_sites("attn[0]", hooks) == ["blocks.0.attn.hook_z"]
    assert resolve_patch_sites("mlp", hooks) == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert resolve_patch_sites("attn[1]+mlp[0]", hooks) == ["blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"]
    assert resolve_patch_sites("all", hooks) == hooks
    with pytest.raises(SaekitError, match="names no codebook"):
        resolve_patch_sites("mlp[5]", hooks)
    with pytest.raises(SaekitError, match="names no codebook"):
        resolve_patch_sites("resid", hooks)


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_options_and_user_errors(tmp_path):
    from typer.testing import CliRunner

    from saekit_cli.main import app

    r = CliRunner()
    out = r.invoke(app, ["intervene", "--help"])
    assert out.exit_code == 0 and "--codebook-model" in out.output and "--positions" in out.output
    out = r.invoke(app, ["toy", "eval", "--help"])
    assert out.exit_code == 0 and "--codebook-model" in out.output and "--min-recall" in out.output
    # user mistakes: a SaekitError (main() prints it as one `error:` line, exit 2), before any model loads
    for argv, msg in ((["intervene", "--codebook-model", str(tmp_path / "nope")], "does not exist"),
                      (["toy", "eval"], "--codebook-model"),
                      (["toy", "eval", "--codebook-model", str(tmp_path), "--store", str(tmp_path)], "not both"),
                      (["intervene", "--codebook-model", str(tmp_path), "--dicts", str(tmp_path)], "not both")):
        out = r.invoke(app, argv)
        assert isinstance(out.exception, SaekitError) and msg in str(out.exception), argv
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "saekit", "intervene", "--codebook-model", str(tmp_path), "--positions", "middle"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "positions" in p.stderr and "Traceback" not in p.stderr


# --- steering with codes -----------------------------------------------------------------------------


def test_forcing_a_code_makes_it_its_groups_choice_everywhere(toy_in_model):
    from saekit.analysis.codebook_model import CodebookModel
    from saekit.inmodel.codebooks import build_codebook, parse_spec
    from saekit.toy.fsm import generate

    im = toy_in_model
    specs = parse_spec("attn[0]:k=1,groups=heads,codes=16;mlp[1]:k=2,codes=32", 2)
    torch.manual_seed(1)
    cbs = {s.hook: build_codebook(s, im.shapes[s.hook]) for s in specs}
    cbm = CodebookModel(im.hf, cbs, {h: im.sites[h] for h in cbs}, im.bos_id, skip_bos=True)
    t = torch.from_numpy(generate(load_fsm("toy"), 3, 20, seed=1)[0])
    _, clean = cbm.run(t, record=True)
    _, forced = cbm.run(t, record=True, force={"blocks.0.attn.hook_z": [16 + 5]})  # head 1, code 5
    c, f = clean.codes["blocks.0.attn.hook_z"], forced.codes["blocks.0.attn.hook_z"]
    assert (f[:, 1:, 16:32].argmax(-1) == 5).all() and (f[:, 1:, 16:32].sum(-1) == 1).all()
    assert torch.equal(f[:, 1:, :16], c[:, 1:, :16])  # head 0 computes its own code as before
    assert (f[:, 0] == 0).all()  # BOS is never replaced
    steered = cbm.sample(3, 30, 0, prompt=t[:, :5], force={"blocks.0.attn.hook_z": [21]})
    plain = cbm.sample(3, 30, 0, prompt=t[:, :5])
    assert torch.equal(steered[:, :5], plain[:, :5]) and not torch.equal(steered, plain)
    with pytest.raises(SaekitError, match="no codebook"):
        cbm.run(t, force={"blocks.1.attn.hook_z": [0]})


# --- the fast k = 1 code choice (benchmarks/codebook_speed.py) ----------------------------------------


@pytest.mark.parametrize("similarity", ["inner", "cosine"])
@pytest.mark.parametrize("G,C,d_g,n", [(4, 1000, 32, 700), (1, 50, 16, 257), (3, 7, 5, 1)])
def test_k1_choice_equals_the_reference(similarity, G, C, d_g, n):
    from saekit.dictionaries.codebook import code_similarity
    from saekit.dictionaries.codebook_k1 import choose_codes_k1

    g = torch.Generator().manual_seed(G * 1000 + n)
    xn = torch.randn(n, G * d_g, generator=g)
    cb = torch.randn(G, C, d_g, generator=g) * torch.rand(G, C, 1, generator=g)  # codes of different norms
    fast = choose_codes_k1(xn, cb, similarity, block=64)
    ref = code_similarity(xn.view(n, G, d_g), cb, similarity).argmax(-1).t()  # (n, G): the eager definition
    assert fast.shape == (n, G, 1) and torch.equal(fast[..., 0], ref)
    from saekit.dictionaries.codebook import choose_codes

    assert torch.equal(choose_codes(xn, cb, 1, similarity), fast)  # the dispatch uses it for k = 1
    assert choose_codes(xn, cb, 2, similarity).shape == (n, G, 2)  # k > 1 keeps the reference path


# --- offline dictionaries on a store: the same matched-recall summary ---------------------------------


from test_toy_eval import HOOK, _oracle_codebook, toy_store  # noqa: E402,F401 - that module's tiny toy store fixture


def test_store_mode_matched_recall_agrees_with_a_direct_count(tmp_path, toy_store):  # noqa: F811
    from saekit import load
    from saekit.store import ActivationStore
    from saekit.toy.eval import state_recovery
    from saekit.toy.fsm import labels_from_tokens, load_fsm

    root, model, labels_file, store = toy_store
    dpath = _oracle_codebook(store, tmp_path / "oracle")
    res = state_recovery([str(dpath)], str(store))
    m = res.matched
    assert res.matched_neuron_hooks == [HOOK]  # the store's only hook (a residual: the dictionaries' hooks stand in)
    st = ActivationStore(store)
    r = st.split("eval")
    tokens = st.read_tokens(r.start, r.stop)
    mask = st.row_mask(tokens)
    fsm = load_fsm(st.model.name)
    lab = labels_from_tokens(fsm, tokens)
    y = np.where(lab.complete, lab.state, -1)[mask]
    acts = st.read_acts(HOOK, r.start, r.stop)[mask]
    with torch.no_grad():
        fired = load(dpath).encode(torch.from_numpy(acts)).numpy() != 0
    for s in range(fsm.n_states):
        pos = (y == s).sum()
        if pos == 0:
            continue
        tp = (fired & (y == s)[:, None]).sum(0)
        prec, rec = tp / np.maximum(fired.sum(0), 1), tp / pos
        ok = rec > 0.01
        assert ok.any() and m.code[s] >= 0
        assert m.precision[s] == pytest.approx(prec[ok].max()) and m.recall[s] == pytest.approx(rec[m.code[s]])
        # the neuron at that recall, counted directly
        n = max(1, int(np.floor(m.recall[s] * pos + 1e-9)))
        best = 0.0
        for j in range(acts.shape[1]):
            t = np.sort(acts[y == s, j])[::-1][n - 1]
            best = max(best, ((acts[:, j] >= t) & (y == s)).sum() / (acts[:, j] >= t).sum())
        assert m.neuron_precision[s] == pytest.approx(best, rel=1e-6)
    d = res.to_dict()["matched_recall"]
    assert d["neuron_hooks"] == [HOOK] and 0 <= d["mean_feature_precision"] <= 1


def test_bos_rule_read_from_the_run(tmp_path):
    """A codebook model is evaluated with the BOS rule it was trained with: config.json, else report.json's config,
    else the codebooks' own training config (the shipped toy-paper keeps only the last two)."""
    import json
    from types import SimpleNamespace

    from saekit.analysis.codebook_model import _skip_bos

    cbs = {"a": SimpleNamespace(train_config={"skip_bos": False}), "b": SimpleNamespace(train_config={"skip_bos": False})}
    assert _skip_bos(tmp_path, cbs) is False
    assert _skip_bos(tmp_path, {"a": SimpleNamespace(train_config={})}) is True  # nothing says: splice-eval's default
    (tmp_path / "report.json").write_text(json.dumps({"config": {"skip_bos": True}}))
    assert _skip_bos(tmp_path, cbs) is True
    (tmp_path / "config.json").write_text(json.dumps({"skip_bos": False}))
    assert _skip_bos(tmp_path, {}) is False
    mixed = {"a": SimpleNamespace(train_config={"skip_bos": False}), "b": SimpleNamespace(train_config={"skip_bos": True})}
    with pytest.raises(SaekitError, match="different BOS rules"):
        _skip_bos(tmp_path / "nothing-here", mixed)


def test_shipped_paper_model_replaces_bos_as_trained():
    from saekit.analysis.codebook_model import _skip_bos
    from saekit.interop import find_dictionary_folders, load
    from saekit.toy import paper_dir

    root = paper_dir()
    cbs = {str(f): load(f) for f in find_dictionary_folders(root / "codebooks", ("saekit",))}
    assert len(cbs) == 8 and _skip_bos(root, cbs) is False  # trained with --preset paper: every position, BOS included


def test_shipped_codebook_toy_keeps_the_fsm():
    """`toy-codebooks` (the toy fine-tuned with k = 1 codebooks at every layer, benchmarks/paper_run.md) loads by
    name, replaces BOS as trained, and with all its codebooks active still walks the FSM: its measured transition
    accuracy is 97.6% (the original toy's 97.2%), so 16 sampled walks fall below 90% only if the shipped files broke."""
    from saekit.analysis.codebook_model import CodebookModel
    from saekit.toy.fsm import transition_accuracy

    torch.manual_seed(0)
    cbm = CodebookModel.load("toy-codebooks")
    assert len(cbm.hooks) == 4 and cbm.skip_bos is False
    fsm = load_fsm(cbm.path)
    tokens = cbm.sample(16, 64, seed=0).cpu().numpy()
    acc, n = transition_accuracy(fsm, tokens)
    assert n > 400 and acc > 0.9
    plain, _ = transition_accuracy(fsm, cbm.sample(16, 64, seed=0, codebooks=False).cpu().numpy())
    assert plain < 0.8  # the codebooks are part of this model: without them it is a different, worse one (68% measured)
