"""Feature analysis: the streaming statistics against brute force, `saekit analyze` end to end,
feature ids, steering and interventions (on small models made here)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from saekit.analysis.ids import feature_id, parse_feature_id, parse_feature_ids
from saekit.analysis.stats import FeatureStats, logit_effects
from saekit.tokens import PAD
from saekit.errors import SaekitError

HOOK = "blocks.0.hook_resid_post"


# --- streaming statistics ---------------------------------------------------------------------


def _random_batch(seed, n=12, ctx=10, d=6):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.1, 1.0, 5.0, 30.0, 1.0, 2.0])[:d]
    codes = torch.relu(torch.randn(n, ctx, d, generator=g) * scales - 0.3)
    codes[..., 4] = 0  # a dead feature
    tokens = torch.randint(0, 50, (n, ctx), generator=g)
    mask = torch.ones(n, ctx, dtype=torch.bool)
    mask[:, 0] = False  # BOS
    mask[-2:, -3:] = False  # padding
    return codes, tokens, mask


@pytest.mark.parametrize("chunk", [1, 3, 12])
def test_stats_match_brute_force(chunk):
    codes, tokens, mask = _random_batch(0)
    n, ctx, d = codes.shape
    N, w, B = 4, 2, 8
    acc = FeatureStats(d, top_n=N, window=w, bins=B)
    for s in range(0, n, chunk):
        acc.update(codes[s:s + chunk], tokens[s:s + chunk], mask[s:s + chunk], s)
    r = acc.result()
    rows = codes[mask]  # (rows, d)
    assert r.n_rows == int(mask.sum())
    assert torch.equal(r.count, (rows > 0).sum(0))
    assert torch.allclose(r.act_max, rows.max(0).values)
    assert torch.allclose(r.act_sum, rows.double().sum(0))
    assert r.count[4] == 0 and (r.top_seq[4] == -1).all()
    for f in range(d):
        v = rows[:, f][rows[:, f] > 0]
        if v.numel():
            assert r.hist_max[f] > v.max()  # half-open bins: the range covers the largest value
            ref = torch.histc(v, bins=B, min=0, max=float(r.hist_max[f])).long()
            assert torch.equal(r.hist[f], ref), f
    # Top N: values equal a global topk over counted positions, with the right (seq, pos) and window.
    masked = (codes * mask[..., None]).reshape(-1, d).T
    ref_vals = torch.topk(masked, N, dim=1).values
    got = r.top_values
    live = ref_vals > 0
    assert torch.allclose(got[live], ref_vals[live])
    for f in range(d):
        for j in range(N):
            if r.top_seq[f, j] < 0:
                continue
            s, p = int(r.top_seq[f, j]), int(r.top_pos[f, j])
            assert codes[s, p, f] == r.top_values[f, j] and mask[s, p]
            for o in range(-w, w + 1):
                q = p + o
                if 0 <= q < ctx:
                    assert r.window_tokens[f, j, o + w] == tokens[s, q]
                    assert r.window_acts[f, j, o + w] == codes[s, q, f] * mask[s, q]
                else:
                    assert r.window_tokens[f, j, o + w] == PAD


def test_histogram_growth_is_exact_when_ranges_double():
    """Values arriving in increasing order force many range doublings; bins must still equal a one-shot histogram."""
    vals = torch.tensor([0.01, 0.02, 0.3, 1.7, 9.0, 60.0, 61.0, 500.0])
    acc = FeatureStats(1, top_n=2, window=0, bins=16)
    for i, v in enumerate(vals):
        acc.update(v.view(1, 1, 1), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), i)
    r = acc.result()
    assert r.hist_max[0] > vals.max() and r.hist_max[0] <= 2 * vals.max()
    assert torch.equal(r.hist[0], torch.histc(vals, bins=16, min=0, max=float(r.hist_max[0])).long())
    assert r.top_values[0].tolist() == [500.0, 61.0] and r.top_seq[0].tolist() == [7, 6]


def test_logit_effects_rank_the_unembedding_column():
    g = torch.Generator().manual_seed(0)
    W_U = torch.randn(8, 20, generator=g)
    dirs = W_U[:, [3, 11]].T.clone()  # directions aligned with the unembedding of tokens 3 and 11
    top, tv, bot, bv = logit_effects(dirs, W_U, n=3)
    ref = (dirs - dirs.mean(-1, keepdim=True)) @ W_U
    assert torch.equal(top, torch.topk(ref, 3, dim=1).indices)
    assert torch.equal(bot, torch.topk(-ref, 3, dim=1).indices)
    assert (tv[:, 0] >= tv[:, 1]).all() and (bv[:, 0] <= bv[:, 1]).all()
    gamma = torch.rand(8, generator=g) + 0.5
    top_g = logit_effects(dirs, W_U, gamma=gamma, n=3)[0]
    assert torch.equal(top_g, torch.topk(((dirs - dirs.mean(-1, keepdim=True)) * gamma) @ W_U, 3, dim=1).indices)


# --- fixtures: a store and dictionaries on the tiny model -------------------------------------


@pytest.fixture(scope="module")
def store_dir(tiny_model_dir, tiny_text_file, tmp_path_factory):
    from saekit.harvest import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("store") / "s"
    cfg = HarvestConfig(model=tiny_model_dir, hooks=[HOOK, "blocks.1.attn.hook_z"], data=tiny_text_file,
                        context_size=32, packing="doc", tokens=1600, batch_size=16, out=str(out), holdout=0.1)
    return str(harvest(cfg, progress=False))


def _provenance(store, hook):
    from saekit.dictionaries import Provenance

    return Provenance(hook=hook, model=store.model.to_dict(), hook_shape=store.hook_shape(hook),
                      scale=float(store.stats(hook)["scale"]), store=str(store.path))


@pytest.fixture(scope="module")
def sae_dir(store_dir, tmp_path_factory):
    """A ReLU SAE whose first latents are ±coordinate detectors (known firing), the rest random."""
    from saekit.dictionaries import DictConfig, build
    from saekit.store import ActivationStore

    st = ActivationStore(store_dir)
    d_in = st.hook_width(HOOK)
    d = build(DictConfig(kind="relu", d_in=d_in, d_dict=2 * d_in), _provenance(st, HOOK))
    with torch.no_grad():
        eye = torch.eye(d_in)
        d.W_enc.copy_(torch.cat([eye, -eye], 1))
        d.W_dec.copy_(torch.cat([eye, -eye], 0))
        d.b_enc.zero_()
        d.b_enc[-1] = -1e6  # one dead feature
        d.b_dec.zero_()
    return str(d.save(tmp_path_factory.mktemp("dict") / "sae"))


@pytest.fixture(scope="module")
def analysis_dir(sae_dir, store_dir, tmp_path_factory):
    from saekit.analysis.analyze import AnalyzeConfig, analyze

    out = tmp_path_factory.mktemp("analysis") / "a"
    analyze(AnalyzeConfig(dict=sae_dir, store=store_dir, out=str(out), top_n=5, window=3, batch_seqs=7))
    return str(out)


def test_analyze_outputs_agree_with_direct_computation(analysis_dir, sae_dir, store_dir):
    from saekit import load
    from saekit.analysis.analyze import load_analysis
    from saekit.store import ActivationStore

    a = load_analysis(analysis_dir)
    d = load(sae_dir)
    st = ActivationStore(store_dir)
    toks = st.read_tokens(0, st.n_sequences)
    mask = torch.from_numpy(st.row_mask(toks))
    x = torch.from_numpy(st.read_acts(HOOK, 0, st.n_sequences))[mask]
    codes = d.encode(x)
    fired = (codes > 0).sum(0)
    assert a.meta["n_rows"] == int(mask.sum())
    assert torch.equal(a.tensors["count"], fired)
    freq = [f["frequency"] for f in a.meta["features"]]
    assert np.allclose(freq, (fired / mask.sum()).numpy(), rtol=1e-3)
    last = feature_id(d, d.cfg.d_dict - 1)
    assert a.meta["dead"] == [last]
    # Every feature fires on roughly half the tokens (a coordinate's sign), so they are all dense at 0.1.
    assert len(a.meta["dense"]) == d.cfg.d_dict - 1
    # The top context of feature 0 is the position with the largest coordinate 0, with its token in the middle.
    f0 = a.feature(feature_id(d, 0))
    c = f0["contexts"][0]
    assert math.isclose(c["value"], float(codes[:, 0].max()), rel_tol=1e-3)
    s, p = c["seq"], c["pos"]
    assert toks[s, p] == c["tokens"][c["center"]]
    assert "[[" in a.context_text(feature_id(d, 0))
    # Logit effects for a residual hook: direction (centred, times ln_f weight) @ W_U.
    from saekit.models import load_model

    lm = load_model(st.model.name)
    dirs = d.directions()[:3]
    gamma = dict(lm.bridge.ln_final.named_parameters())["_original_component.weight"]
    ref = ((dirs - dirs.mean(-1, keepdim=True)) * gamma) @ lm.bridge.W_U
    assert torch.equal(a.tensors["promote_ids"][:3], torch.topk(ref, a.tensors["promote_ids"].shape[1], dim=1).indices)
    assert f0["promotes"][0][0] == int(a.tensors["promote_ids"][0, 0])
    # Files: no temporaries left, JSON and safetensors only, PNG written.
    names = sorted(os.listdir(analysis_dir))
    assert names == ["dashboard.html", "density.png", "feature_table.html", "feature_table.md", "features.json", "neuronpedia",
                     "stats.safetensors"]
    with open(os.path.join(analysis_dir, "density.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_explanations_are_scored_on_the_eval_split(analysis_dir, sae_dir, store_dir):
    """Each feature's recorded precision/recall equal a brute-force count of its token rule on eval sequences."""
    from saekit import load
    from saekit.analysis.analyze import load_analysis
    from saekit.store import ActivationStore

    a, d, st = load_analysis(analysis_dir), load(sae_dir), ActivationStore(store_dir)
    ev = st.split("eval")
    toks = st.read_tokens(ev.start, ev.stop)
    mask = st.row_mask(toks)
    x = torch.from_numpy(st.read_acts(HOOK, ev.start, ev.stop))
    fired = (d.encode(x.reshape(-1, x.shape[-1])) > 0).reshape(*toks.shape, -1).numpy()
    prev = np.full_like(toks, -1)
    prev[:, 1:] = toks[:, :-1]
    checked = 0
    for f in a.meta["features"][:12]:
        e = f["explanation"]
        if not e["terms"]:
            continue
        hit = np.zeros(toks.shape, bool)
        for p, t in e["terms"]:
            hit |= (toks == t) & ((prev == p) if p is not None else True)
        hit &= mask
        fire = fired[..., f["index"]] & mask
        tp, pred = int((hit & fire).sum()), int(hit.sum())
        assert e["heldout_fires"] == int(fire.sum())
        assert math.isclose(e["precision"], tp / pred if pred else 0.0, rel_tol=1e-3, abs_tol=1e-9)
        assert math.isclose(e["recall"], tp / fire.sum() if fire.sum() else 0.0, rel_tol=1e-3, abs_tol=1e-9)
        checked += 1
    assert checked > 0
    md = open(os.path.join(analysis_dir, "feature_table.md")).read()
    assert md.count("\n| `") == sum(1 for f in a.meta["features"] if f["count"] > 0) and "**" in md


def test_analyze_token_budget_and_hook_z_logits(store_dir, tmp_path):
    """A codebook on attn.hook_z: ids layer.group.code, logit effects through W_O, --tokens stops early."""
    from saekit.analysis.analyze import AnalyzeConfig, analyze, load_analysis
    from saekit.dictionaries import DictConfig, build
    from saekit.store import ActivationStore

    st = ActivationStore(store_dir)
    hook = "blocks.1.attn.hook_z"
    d = build(DictConfig(kind="codebook", d_in=st.hook_width(hook), d_dict=4 * 6, k=1, groups=4), _provenance(st, hook))
    ddir = d.save(tmp_path / "cb")
    out = analyze(AnalyzeConfig(dict=str(ddir), store=store_dir, out=str(tmp_path / "a"), tokens=100, top_n=3))
    a = load_analysis(out)
    assert a.meta["n_rows"] == 100
    assert a.meta["features"][7]["id"] == "1.1.1"
    # k=1 per group and 4 groups: each token fires exactly 4 codes.
    assert int(a.tensors["count"].sum()) == 4 * 100
    assert "W_O" in a.meta["logit_note"] and "promotes" in a.meta["features"][0]


def test_feature_ids_round_trip_and_errors(sae_dir):
    from saekit import load

    d = load(sae_dir)
    n = d.cfg.d_dict
    assert [parse_feature_id(d, feature_id(d, i)) for i in range(n)] == list(range(n))
    assert parse_feature_ids(d, "0.3,0.5") == [3, 5]
    with pytest.raises(SaekitError, match="out of range"):
        parse_feature_id(d, f"0.{n}")
    with pytest.raises(SaekitError, match="layer 2"):
        parse_feature_id(d, "2.1")
    with pytest.raises(SaekitError, match="numbers"):
        parse_feature_id(d, "x.1")


def test_analyze_refuses_mismatched_store_and_empty_split(sae_dir, store_dir, tiny_text_file, tmp_path):
    from saekit.analysis.analyze import AnalyzeConfig, analyze
    from saekit.harvest import HarvestConfig, harvest
    from conftest import write_tiny_gpt2

    other_model = write_tiny_gpt2(tmp_path / "other", seed=1)
    other = harvest(HarvestConfig(model=other_model, hooks=[HOOK], data=tiny_text_file, context_size=16, packing="doc",
                                  tokens=160, out=str(tmp_path / "s2"), holdout=0.0), progress=False)
    with pytest.raises(SaekitError, match="different|trained on model"):
        analyze(AnalyzeConfig(dict=sae_dir, store=str(other), out=str(tmp_path / "x")))
    wrong_hook = harvest(HarvestConfig(model=other_model, hooks=["blocks.1.hook_resid_post"], data=tiny_text_file, context_size=16,
                                       packing="doc", tokens=160, out=str(tmp_path / "s3"), holdout=0.0), progress=False)
    with pytest.raises(SaekitError, match="hook"):
        analyze(AnalyzeConfig(dict=sae_dir, store=str(wrong_hook), out=str(tmp_path / "y")))
    with pytest.raises(SaekitError, match="empty"):  # holdout 0: the eval split has no sequences
        from saekit.dictionaries import DictConfig, build
        from saekit.store import ActivationStore

        st = ActivationStore(other)
        ddir = build(DictConfig(kind="relu", d_in=st.hook_width(HOOK), d_dict=8), _provenance(st, HOOK)).save(tmp_path / "d2")
        analyze(AnalyzeConfig(dict=str(ddir), store=str(other), out=str(tmp_path / "z"), split="eval"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_cli_analyze_and_errors(sae_dir, store_dir, tmp_path):
    exe = [sys.executable, "-m", "saekit"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run(exe + ["analyze", "--dict", sae_dir, "--store", store_dir, "--out", str(tmp_path / "a"), "--tokens", "200",
                              "--top-n", "3"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "a" / "features.json").read_text())["n_rows"] == 200
    r = subprocess.run(exe + ["analyze", "--dict", sae_dir, "--store", str(tmp_path / "nope"), "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


# --- steering ------------------------------------------------------------------------------------


def test_steer_adds_direction_and_reports_match_rates(sae_dir, store_dir):
    from saekit import load
    from saekit.analysis.steer import SteerConfig, steer
    from saekit.models import load_model
    from saekit.store import ActivationStore

    st = ActivationStore(store_dir)
    lm = load_model(st.model.name)
    d = load(sae_dir)
    cfg = SteerConfig(dict=sae_dir, feature=["0.0"], prompt="the cat", strength=0.0, samples=4, max_new_tokens=6, seed=3, match="a")
    res0 = steer(cfg, model=lm, dictionary=d)
    assert res0.steered == res0.unsteered  # strength 0 changes nothing: same seed, same draws
    assert res0.steered_rate == res0.unsteered_rate == sum("a" in s for s in res0.steered) / 4
    big = steer(SteerConfig(dict=sae_dir, feature=["0.0", "0.1"], prompt="the cat", strength=200.0, samples=4, max_new_tokens=6,
                            seed=3, temperature=0), model=lm, dictionary=d)
    assert big.steered != big.unsteered and big.features == ["0.0", "0.1"]
    # Greedy steered text equals a hand-written hook adding the same vector.
    delta = 200.0 * (d.directions()[0] + d.directions()[1])
    ids = torch.tensor([[lm.bos_id] + lm.tokenizer.encode("the cat", add_special_tokens=False)])
    with lm.bridge.hooks(fwd_hooks=[(HOOK, lambda a, hook: a + delta)]):
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, lm.bridge(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    # (the fixture's character tokenizer has no decoder, so pieces are joined as written)
    assert big.steered[0] == "".join(lm.tokenizer.decode([i]) for i in seq[0, ids.shape[1]:].tolist())
    with pytest.raises(SaekitError, match="out of range"):
        steer(SteerConfig(dict=sae_dir, feature=["0.9999"], prompt="a"), model=lm, dictionary=d)


def test_codebook_forcing_sets_code_coefficients():
    from saekit.analysis.steer import steering_delta
    from saekit.dictionaries import DictConfig, Provenance, build

    d = build(DictConfig(kind="codebook", d_in=8, d_dict=12, k=1, groups=2), Provenance(hook=HOOK, scale=2.0))
    x = torch.randn(5, 8)
    c = d.encode(x)
    forced = [1, 7]
    delta = steering_delta(d, forced, 1.0)(x)
    c2 = c.clone()
    c2[:, forced] = 1.0
    assert torch.allclose(x + delta, x + d.decode(c2) - d.decode(c), atol=1e-6)


# --- interventions ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_like(tmp_path_factory):
    """A small untrained model in the toy format (digit vocabulary + fsm.json), 1-digit states."""
    from saekit.models import load_model
    from saekit.toy.fsm import FSM
    from saekit.toy.train import ToyTrainConfig, build_model, make_tokenizer
    from saekit.config import from_flags

    path = tmp_path_factory.mktemp("toylike")
    cfg = from_flags(ToyTrainConfig, out=str(path), n_states=10, out_degree=3, digits=1, n_layer=2, d_model=32, n_head=4, d_mlp=64, ctx=32)
    hf = build_model(cfg)
    hf.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    fsm = FSM.random(n_states=10, out_degree=3, digits=1, seed=0)
    fsm.save(path / "fsm.json")
    return load_model(str(path)), fsm


def _identity_sae(lm, hook):
    """x̂ = ReLU(x) − ReLU(−x) = x exactly: patching its codes moves the whole activation."""
    from saekit.dictionaries import DictConfig, Provenance, build

    w = lm.info.d_model
    d = build(DictConfig(kind="relu", d_in=w, d_dict=2 * w), Provenance(hook=hook, model=lm.info.to_dict()))
    with torch.no_grad():
        eye = torch.eye(w)
        d.W_enc.copy_(torch.cat([eye, -eye], 1))
        d.W_dec.copy_(torch.cat([eye, -eye], 0))
        d.b_enc.zero_()
        d.b_dec.zero_()
    return d


def test_intervention_with_exact_dictionary_at_last_layer_reproduces_b(toy_like):
    from saekit.analysis.intervene import intervene, make_pairs

    lm, fsm = toy_like
    last = _identity_sae(lm, "blocks.1.hook_resid_post")
    first = _identity_sae(lm, "blocks.0.hook_resid_post")
    ta, tb = make_pairs(fsm, 24, n_states=5, seed=1)
    assert (ta[:, 0] == 10).all() and ta.shape == (24, 6)
    res = intervene(lm, [first, last], fsm, layers=[1], pairs=(ta, tb))
    # The last position's final residual is B's, so its next-token distribution is B's exactly.
    assert res.layers == [1] and res.js < 1e-6
    assert res.success_rate == pytest.approx(res.clean_b_success)
    assert res.clean_a_js > 1e-4  # A and B really differ, so the check above could fail
    nothing = intervene(lm, [first], fsm, layers=[0], pairs=(ta, tb), error="keep")
    assert 0 <= nothing.success_rate <= 1 and nothing.js >= 0
    with pytest.raises(SaekitError, match="layer"):
        intervene(lm, [first], fsm, layers=[3], pairs=(ta, tb))


def test_cli_steer_prints_both_arms_and_refuses_bad_feature(sae_dir, store_dir):
    exe = [sys.executable, "-m", "saekit", "steer", "--dict", sae_dir, "--prompt", "the cat", "--max-new-tokens", "4",
           "--samples", "2", "--match", "a"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    r = subprocess.run(exe + ["--feature", "0.1"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "unsteered" in r.stdout and "steered" in r.stdout and "match 'a'" in r.stdout
    r = subprocess.run(exe + ["--feature", "0.100000"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "out of range" in r.stderr and "Traceback" not in r.stderr


# --- sampled contexts, neighbours, quartile groups ---------------------------------------------------


def test_sampled_contexts_are_firings_drawn_across_batches():
    from saekit.analysis.stats import FeatureStats

    g = torch.Generator().manual_seed(3)
    d, S = 5, 40
    acc = FeatureStats(d, top_n=3, window=1, bins=8, samples=S, seed=1)
    firings = {}
    for b in range(2):
        codes = torch.rand(50, 8, d, generator=g) * (torch.rand(50, 8, d, generator=g) < 0.25)
        codes[..., 4] = 0
        codes[0, 1, 4] = 3.0 if b == 0 else 0.0  # feature 4 fires once in all
        tokens = torch.randint(0, 20, (50, 8), generator=g)
        acc.update(codes, tokens, torch.ones(50, 8, dtype=torch.bool), b * 50)
        for s, p, f in codes.nonzero().tolist():
            firings[(b * 50 + s, p, f)] = float(codes[s, p, f])
    r = acc.result()
    for f in range(d):
        got = [(int(s), int(p)) for s, p in zip(r.sample_seq[f].tolist(), r.sample_pos[f].tolist()) if s >= 0]
        n_fired = sum(1 for k in firings if k[2] == f)
        assert len(got) == min(S, n_fired) and len(set(got)) == len(got)
        for j, (s, p) in enumerate(got):
            assert firings[(s, p, f)] == pytest.approx(float(r.sample_values[f, j]))
            assert int(r.sample_tokens[f, j, 1]) >= 0  # the centre of the window is the firing token
        if f != 4:
            first = sum(1 for s, _ in got if s < 50)
            assert 8 <= first <= 32, (f, first)  # a uniform sample draws from both batches (~20 each)
    assert r.sample_values[4, 0] == 3.0 and (r.sample_seq[4, 1:] == -1).all()


def test_decoder_neighbours_match_brute_force():
    from saekit.analysis.stats import decoder_neighbours

    dirs = torch.randn(37, 6, generator=torch.Generator().manual_seed(0))
    ids, cos = decoder_neighbours(dirs, n=3, chunk=8)
    u = torch.nn.functional.normalize(dirs, dim=1)
    full = u @ u.T
    full.fill_diagonal_(-2)
    v, i = full.topk(3, dim=1)
    assert torch.equal(ids, i) and torch.allclose(cos, v)


def test_quartile_groups_split_the_sample_by_value():
    from saekit.analysis.analyze import quartile_groups

    samples = [{"value": float(v)} for v in [5, 1, 8, 3, 2, 7, 6, 4]]
    groups = quartile_groups(samples)
    assert [(g["lo"], g["hi"]) for g in groups] == [(7.0, 8.0), (5.0, 6.0), (3.0, 4.0), (1.0, 2.0)]
    assert [c["value"] for c in groups[0]["contexts"]] == [8.0, 7.0] and all(g["share"] == 0.25 for g in groups)
    assert quartile_groups([]) == []
