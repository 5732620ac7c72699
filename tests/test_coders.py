"""Transcoders, skip transcoders, crosscoders and CLTs: planted sparse maps recovered, the several-hook
interface (encode_hooks / decode_hooks / predict), resume bitwise equal, store-driven CLI runs and the
mistakes refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from saekit.dictionaries import DictConfig, Provenance, build
from saekit.errors import SaekitError
from saekit.interop import load
from saekit.config import from_flags
from saekit.train import HookSource, TrainConfig, Trainer, tensor_batches

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py

D, N_FEAT, K = 16, 24, 2
IN0, OUT0, IN1, OUT1 = "blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"


def unit_rows(n, d, seed):
    A = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return A / A.norm(dim=-1, keepdim=True)


def sparse_codes(n, seed, signed=False):
    """(n, N_FEAT): K features per row with magnitudes in [0.5, 1.5] (random signs if `signed`)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, N_FEAT, generator=g).topk(K, dim=-1).indices
    c = 0.5 + torch.rand(n, K, generator=g)
    if signed:
        c = c * (torch.randint(0, 2, (n, K), generator=g) * 2 - 1)
    return torch.zeros(n, N_FEAT).scatter(1, idx, c)


def planted_mlps(n=20_000, seed=0):
    """Two "MLPs" that are sparse dictionaries: layer l's input is s_l A_l, its output s_0 B_0l (+ s_1 B_11).

    Returns the rows per hook and the true decoder directions per kind.
    """
    s0, s1 = sparse_codes(n, 1 + 2 * seed), sparse_codes(n, 2 + 2 * seed)
    A0, B00, A1, B01, B11 = (unit_rows(N_FEAT, D, i) for i in range(10, 15))
    data = {IN0: s0 @ A0, OUT0: s0 @ B00, IN1: s1 @ A1, OUT1: s0 @ B01 + s1 @ B11}
    truth = {"transcoder": B00, "crosscoder": torch.cat([A0, B00], 1),
             "clt": torch.cat([torch.cat([B00, B01], 1), torch.cat([torch.zeros(N_FEAT, D), B11], 1)])}
    return data, truth


def mean_max_cos(W, T):
    """Mean over true directions of the best cosine with a learnt one."""
    return float((F.normalize(T, dim=-1) @ F.normalize(W, dim=-1).T).max(1).values.mean())


def coder_cfg(kind, tmp_path, name="out", **kw):
    hooks = {"crosscoder": [IN0, OUT0], "clt": [IN0, IN1]}.get(kind, [IN0])
    target = {"crosscoder": [], "clt": [OUT0, OUT1]}.get(kind, [OUT0])
    base = dict(kind=kind, hooks=hooks, target=target, d_dict=96 if kind == "clt" else 48, k=[K], tokens=150_000, batch_size=256,
                lr=3e-3, dead_tokens=5_000, init_rows=1024, log_every=50, checkpoint_every=0, out=str(tmp_path / name), device="cpu")
    return from_flags(TrainConfig, **(base | kw))


def trainer(cfg, data, scale=1.0):
    hooks = {h: HookSource(x.shape[1], Provenance(hook=h, scale=scale)) for h, x in data.items()}
    return Trainer(cfg, hooks, tensor_batches(data, cfg.batch_size, cfg.seed), progress=False)


# --- learning -------------------------------------------------------------------------------------------

CASES = {
    "transcoder-topk": ("transcoder", dict()),
    "transcoder-batchtopk": ("transcoder", dict(activation="batchtopk")),
    "transcoder-relu": ("transcoder", dict(activation="relu", l1=[0.3])),
    "transcoder-jumprelu": ("transcoder", dict(activation="jumprelu", tokens=300_000, lr=1e-3)),
    "crosscoder-topk": ("crosscoder", dict()),
    "clt-topk": ("clt", dict()),
    "clt-batchtopk": ("clt", dict(activation="batchtopk")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_recovers_planted_sparse_map(case, tmp_path):
    kind, kw = CASES[case]
    data, truth = planted_mlps()
    # a scale != 1 checks that training happens in normalised space and predictions come back in the hooks' units
    t = trainer(coder_cfg(kind, tmp_path, **kw), {h: x / 3.0 for h, x in data.items()}, scale=3.0)
    t.fit()
    held_out, _ = planted_mlps(2000, seed=1)  # other rows of the same maps
    s = next(iter(t.evaluate([{h: x / 3.0 for h, x in held_out.items()}], 2000).values()))
    d = t.runs[0].dictionary
    assert mean_max_cos(d.directions().detach(), truth[kind]) >= 0.9
    assert s["fvu"] < (0.1 if kw.get("activation") != "relu" else 0.12), s
    targets = t.runs[0].spec.targets
    assert set(s["fvu_per_hook"]) == set(targets) and all(v < 0.15 for v in s["fvu_per_hook"].values()), s
    if kw.get("activation") in (None, "topk"):
        assert s["l0"] == pytest.approx(K * (2 if kind == "clt" else 1))  # k per layer for a CLT


def test_skip_transcoder_learns_the_linear_part(tmp_path):
    """y = |s| B + x S with x = s A, s of random sign: the linear part of y is x S alone (|s| B is even in s),
    so a skip transcoder's latents find B while a plain transcoder spends latents on x S."""
    n = 20_000
    s = sparse_codes(n, 1, signed=True)
    A, B = unit_rows(N_FEAT, D, 10), unit_rows(N_FEAT, D, 11)
    S = torch.randn(D, D, generator=torch.Generator().manual_seed(12)) / D**0.5
    data = {IN0: s @ A, OUT0: s.abs() @ B + (s @ A) @ S}
    got = {}
    for kind in ("skip-transcoder", "transcoder"):
        t = trainer(coder_cfg(kind, tmp_path, name=kind, d_dict=64, tokens=200_000), data)
        t.fit()
        d = t.runs[0].dictionary
        got[kind] = (mean_max_cos(d.directions().detach(), B), next(iter(t.evaluate([data], 4000).values()))["fvu"])
        if kind == "skip-transcoder":
            assert F.cosine_similarity(d.W_skip.detach().flatten(), S.flatten(), dim=0) > 0.5
    assert got["skip-transcoder"][0] >= 0.9, got
    assert got["skip-transcoder"][1] < got["transcoder"][1], got


# --- the several-hook interface ----------------------------------------------------------------------------

def _coder(kind, act="topk"):
    ins = [IN0, IN1] if kind in ("clt", "crosscoder") else [IN0]
    outs = ins if kind == "crosscoder" else ([OUT0, OUT1] if kind == "clt" else [OUT0])
    cfg = DictConfig(kind=kind, d_in=D * len(ins), d_out=D * len(outs), d_dict=32, k=3, activation=act,
                     in_widths=[D] * len(ins), out_widths=[D] * len(outs))
    d = build(cfg, Provenance(hook=ins[0], in_hooks=ins, out_hooks=outs, in_scales=[2.0] * len(ins), out_scales=[0.5] * len(outs)))
    d.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in (d.b_enc, d.b_dec, d.b_in, *([d.W_skip] if hasattr(d, "W_skip") else [])):
            p.normal_(generator=torch.Generator().manual_seed(1))
    return d.eval(), ins, outs


@pytest.mark.parametrize("kind", ["transcoder", "skip-transcoder", "crosscoder", "clt"])
@pytest.mark.parametrize("act", ["relu", "topk", "batchtopk", "jumprelu"])
def test_predict_is_the_forward_pass_in_hook_units(kind, act):
    d, ins, outs = _coder(kind, act)
    if act == "batchtopk":
        d.threshold.fill_(0.3)
    x = {h: torch.randn(50, D, generator=torch.Generator().manual_seed(i)) for i, h in enumerate(ins)}
    assert d.in_hooks == ins and d.out_hooks == outs
    pred = d.predict(x)
    assert list(pred) == outs
    full = d(torch.cat([x[h] for h in ins], 1))
    assert torch.allclose(torch.cat([pred[h] for h in outs], 1), full.x_hat, atol=1e-5)
    # by hand, in original units: normalise, encode, decode, un-normalise
    xn = torch.cat([x[h] for h in ins], 1) * 2.0
    codes = d.encode_hooks(x)
    assert torch.equal(codes, full.codes)
    y = (codes @ d.W_dec + d.b_dec + (xn @ d.W_skip if kind == "skip-transcoder" else 0)) / 0.5
    assert torch.allclose(torch.cat([pred[h] for h in outs], 1), y, atol=1e-5)


def test_clt_encodes_layer_by_layer_as_all_at_once():
    d, ins, outs = _coder("clt")
    x = {h: torch.randn(40, D, generator=torch.Generator().manual_seed(i)) for i, h in enumerate(ins)}
    both = d.encode_hooks(x)
    first = d.encode_hooks({IN0: x[IN0]})
    m = d.cfg.d_dict // 2
    assert torch.equal(first[:, :m], both[:, :m]) and bool((first[:, m:] == 0).all())
    assert ((both[:, :m] != 0).sum(1) == 3).all() and ((both[:, m:] != 0).sum(1) == 3).all()  # TopK per layer
    # layer 0's output depends on layer 0's latents only (causal), layer 1's on both
    pred_first = d.decode_hooks(first)
    assert torch.allclose(pred_first[OUT0], d.decode_hooks(both)[OUT0], atol=1e-6)
    assert torch.allclose(d.decode_hooks(torch.zeros_like(both))[OUT1], d.b_dec[D:] / 0.5)
    # a latent of layer 1 writes nothing into layer 0's output
    assert bool((d.W_dec[m:, :D] == 0).all()) and bool((d.encoder[:D, m:] == 0).all())


def test_sae_defaults_of_the_interface():
    d = build(DictConfig(kind="topk", d_in=8, d_dict=16, k=2), Provenance(hook="h", scale=2.0))
    x = torch.randn(5, 8)
    assert d.in_hooks == d.out_hooks == ["h"]
    assert torch.equal(d.predict({"h": x})["h"], d(x).x_hat)


def test_old_config_json_loads(tmp_path):
    """A dictionary folder written before the several-hook fields existed still loads (new fields default)."""
    d = build(DictConfig(kind="topk", d_in=8, d_dict=16, k=2), Provenance(hook="h", scale=2.0))
    d.save(tmp_path / "d")
    raw = json.loads((tmp_path / "d" / "config.json").read_text())
    for key in ("activation", "d_out", "in_widths", "out_widths"):
        del raw["arch"][key]
    for key in ("in_hooks", "out_hooks", "in_scales", "out_scales"):
        del raw["provenance"][key]
    (tmp_path / "d" / "config.json").write_text(json.dumps(raw))
    got = load(tmp_path / "d")
    assert got.in_hooks == ["h"] and torch.equal(got.W_dec, d.W_dec)


# --- resume -------------------------------------------------------------------------------------------------

class Killed(Exception):
    pass


def killing(source, at):
    def src(start=0):
        for i, b in enumerate(source(start), start):
            if i == at:
                raise Killed
            yield b

    return src


@pytest.mark.parametrize("kind,act", [("skip-transcoder", "topk"), ("crosscoder", "relu"), ("clt", "batchtopk"), ("transcoder", "jumprelu")])
def test_resume_equals_uninterrupted(kind, act, tmp_path):
    data, _ = planted_mlps(3000)
    kw = dict(activation=act, tokens=30 * 128, batch_size=128, checkpoint_every=10 * 128, log_every=5, init_rows=256, dead_tokens=600)
    full = trainer(coder_cfg(kind, tmp_path, name="full", **kw), data)
    full.fit()
    cut = trainer(coder_cfg(kind, tmp_path, name="cut", **kw), data)
    cut.batches = killing(cut.batches, 23)
    with pytest.raises(Killed):
        cut.fit()
    assert cut.runs[0].paths.checkpoint_steps() == [10, 20]
    again = trainer(coder_cfg(kind, tmp_path, name="cut", resume=True, **kw), data)
    again.fit()
    a, b = full.runs[0], again.runs[0]
    assert list(a.dictionary.state_dict()) == list(b.dictionary.state_dict())
    for (k, va), vb in zip(a.dictionary.state_dict().items(), b.dictionary.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.equal(a.since_fired, b.since_fired)


# --- from a store, through the CLI ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_store(tmp_path_factory):
    from saekit.store.importer import write_rows_store

    data, truth = planted_mlps(12_000)
    out = tmp_path_factory.mktemp("coders") / "store"
    origin = {"kind": "import", "files": [], "rows_per_sequence": 64, "sequences": False, "n": 12_000}
    write_rows_store(out, {h: D for h in data}, lambda _f: iter([data]), context_size=64, dtype="float32", holdout=0.1,
                     shard_tokens=4096, origin=origin)
    return out, truth


def cli(*args):
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # tiny matrices: threads only contend
    return subprocess.run([sys.executable, "-m", "saekit", *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


def test_cli_trains_a_clt_and_a_transcoder_sweep_from_one_store(mlp_store, tmp_path):
    store, truth = mlp_store
    common = ["--store", store, "--tokens", 120_000, "--batch-size", 256, "--lr", 3e-3, "--init-rows", 1024, "--dead-tokens", 5000,
              "--device", "cpu"]
    res = cli("train", "--kind", "clt", "--hook", "all", "--d-dict", 96, "--k", 2, "--out", tmp_path / "clt", *common)
    assert res.returncode == 0, res.stderr
    d = load(tmp_path / "clt" / "clt" / "clt-topk-k2")
    assert d.in_hooks == [IN0, IN1] and d.out_hooks == [OUT0, OUT1]
    cfg = json.loads((tmp_path / "clt" / "clt" / "clt-topk-k2" / "config.json").read_text())
    assert cfg["arch"]["in_widths"] == [D, D] and cfg["train"]["target"] == [] and cfg["provenance"]["out_hooks"] == [OUT0, OUT1]
    assert mean_max_cos(d.directions(), truth["clt"]) >= 0.9
    assert set(d.summary["fvu_per_hook"]) == {OUT0, OUT1} and d.summary["fvu"] < 0.15
    res = cli("train", "--kind", "transcoder", "--hook", IN0, "--target", OUT0, "--d-dict", 48, "--k", "2,3", "--out", tmp_path / "tc", *common)
    assert res.returncode == 0, res.stderr
    for k in (2, 3):
        d = load(tmp_path / "tc" / OUT0 / f"transcoder-topk-k{k}")
        assert d.summary["l0"] == pytest.approx(k) and d.in_hooks == [IN0]
    assert mean_max_cos(load(tmp_path / "tc" / OUT0 / "transcoder-topk-k2").directions(), truth["transcoder"]) >= 0.9


@pytest.mark.parametrize("args,needle", [
    (["--kind", "topk", "--hook", IN0, "--target", OUT0], "--target is for the kinds"),
    (["--kind", "transcoder", "--hook", IN0, "--target", "blocks.5.hook_mlp_out"], "is not in the store"),
    (["--kind", "transcoder", "--hook", IN0, "--target", IN1], "is not an MLP output"),
    (["--kind", "transcoder", "--hook", IN0, "--target", OUT1], "different layers"),
    (["--kind", "transcoder", "--target", OUT0], "needs --hook"),
    (["--kind", "transcoder", "--hook", IN0], "needs --target"),
    (["--kind", "clt", "--hook", IN1, "--target", OUT1], "missing: blocks.0.mlp.hook_in, blocks.0.hook_mlp_out"),
    (["--kind", "crosscoder", "--hook", f"{IN0},{OUT0}", "--target", OUT0], "drop --target"),
    (["--kind", "transcoder", "--hook", IN0, "--target", OUT0, "--activation", "gelu"], "activation"),
])
def test_mistakes_are_one_line(mlp_store, tmp_path, args, needle):
    store, _ = mlp_store
    res = cli("train", "--store", store, "--out", tmp_path / "o", "--tokens", 1000, *args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("config.json"))


def test_library_refuses_the_same(mlp_store, tmp_path):
    from saekit.train import train

    store, _ = mlp_store
    with pytest.raises(SaekitError, match="not an MLP output"):
        train(from_flags(TrainConfig, store=str(store), kind="skip-transcoder", hooks=[IN0], target=[IN1], out=str(tmp_path / "o")), progress=False)
    with pytest.raises(ValueError, match="needs --target"):
        from_flags(TrainConfig, kind="transcoder", hooks=[IN0])


# --- formats -------------------------------------------------------------------------------------------------

def _random_coder(kind, act, scales=(2.0, 0.5)):
    d, ins, outs = _coder(kind, act)
    with torch.no_grad():
        d.W_dec.copy_(torch.randn(d.W_dec.shape, generator=torch.Generator().manual_seed(3)) * (d.dec_mask if d.dec_mask is not None else 1))
        if act == "batchtopk":
            d.threshold.fill_(0.4)
        if act == "jumprelu":
            d.threshold.uniform_(0.0, 0.5, generator=torch.Generator().manual_seed(4))
    return d, ins, outs


@pytest.mark.parametrize("kind,act", [("transcoder", "relu"), ("transcoder", "jumprelu"), ("transcoder", "batchtopk"), ("skip-transcoder", "relu")])
def test_saelens_transcoder_export_and_load(kind, act, tmp_path):
    from safetensors.torch import load_file

    from saekit.interop.saelens import export_saelens

    d, ins, outs = _random_coder(kind, act)
    export_saelens(d, tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "skip_transcoder" if kind == "skip-transcoder" else "transcoder"}.get(act, "jumprelu_transcoder")
    assert cfg["metadata"]["hook_name"] == IN0 and cfg["hook_name_out"] == OUT0 and cfg["d_out"] == D
    t = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(5))
    # SAELens's transcoder formula, written out here from its layout (no input bias, W_skip (d_out, d_in))
    pre = x @ t["W_enc"] + t["b_enc"]
    f = pre.relu() * ((pre > t["threshold"]).float() if "threshold" in t else 1)
    y = f @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "W_skip" in t else 0)
    want = d.predict({IN0: x})[OUT0]
    assert torch.allclose(y, want, atol=1e-4)
    back = load(tmp_path / "sl")
    assert back.cfg.kind == kind and back.in_hooks == [IN0] and back.out_hooks == [OUT0]
    assert torch.allclose(back.predict({IN0: x})[OUT0], want, atol=1e-4)


def test_saelens_refuses_what_it_cannot_hold(tmp_path):
    from saekit.interop.saelens import export_saelens

    for kind, act, needle in [("transcoder", "topk", "no TopK transcoder"), ("skip-transcoder", "jumprelu", "ReLU only"),
                              ("clt", "relu", "circuit-tracer")]:
        with pytest.raises(SaekitError, match=needle):
            export_saelens(_coder(kind, act)[0], tmp_path / kind)
        assert not (tmp_path / kind).exists()


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoder_folder_loads(skip, tmp_path):
    from safetensors.torch import save_file

    n, k = 40, 4
    g = torch.Generator().manual_seed(6)
    t = {"encoder.weight": torch.randn(n, D, generator=g), "encoder.bias": torch.randn(n, generator=g) * 0.1,
         "W_dec": torch.randn(n, D, generator=g), "b_dec": torch.randn(D, generator=g)}
    if skip:
        t["W_skip"] = torch.randn(D, D, generator=g)
    folder = tmp_path / "layers.1.mlp"
    folder.mkdir()
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "k": k, "num_latents": n, "activation": "topk", "transcode": True,
                                                 "skip_connection": skip, "normalize_decoder": True}))
    d = load(folder)
    assert d.cfg.kind == ("skip-transcoder" if skip else "transcoder")
    assert d.in_hooks == ["blocks.1.mlp.hook_in"] and d.out_hooks == ["blocks.1.hook_mlp_out"]
    x = torch.randn(32, D, generator=g)
    # sparsify's transcoder: no b_dec subtraction, TopK of ReLU(pre), + x W_skipᵀ
    pre = (x @ t["encoder.weight"].T + t["encoder.bias"]).relu()
    vals, idx = pre.topk(k, dim=-1)
    y = torch.zeros(32, n).scatter(1, idx, vals) @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if skip else 0)
    assert torch.allclose(d.predict({"blocks.1.mlp.hook_in": x})["blocks.1.hook_mlp_out"], y, atol=1e-4)


@pytest.mark.parametrize("act", ["relu", "batchtopk", "jumprelu"])
def test_clt_circuit_tracer_layout_round_trip(act, tmp_path):
    from safetensors.torch import load_file

    from saekit.interop.circuit_tracer import export_circuit_tracer

    d, ins, outs = _random_coder("clt", act)
    export_circuit_tracer(d, tmp_path / "ct")
    x = {h: torch.randn(20, D, generator=torch.Generator().manual_seed(7 + i)) for i, h in enumerate(ins)}
    want = d.predict(x)
    # circuit-tracer's formula on its files: f_i = act(x_i W_enc_iᵀ + b_enc_i); ŷ_j = Σ_{i≤j} f_i W_dec_i[:, j−i] + b_dec_j
    enc = [load_file(str(tmp_path / "ct" / f"W_enc_{i}.safetensors")) for i in range(2)]
    dec = [load_file(str(tmp_path / "ct" / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"] for i in range(2)]
    f = []
    for i, h in enumerate(ins):
        pre = x[h] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        f.append(pre * (pre > enc[i][f"threshold_{i}"]) if f"threshold_{i}" in enc[i] else pre.relu())
    for j, h in enumerate(outs):
        y = sum(f[i] @ dec[i][:, j - i] for i in range(j + 1)) + enc[j][f"b_dec_{j}"]
        assert torch.allclose(y, want[h], atol=1e-4), h
    back = load(tmp_path / "ct")
    assert back.cfg.kind == "clt" and back.in_hooks == ins and back.out_hooks == outs  # from saekit.json beside the files
    got = back.predict(x)
    for h in outs:
        assert torch.allclose(got[h], want[h], atol=1e-4)
    (tmp_path / "ct" / "saekit.json").unlink()  # a folder circuit-tracer wrote: its default hooks, noted
    bare = load(tmp_path / "ct")
    assert bare.in_hooks == [f"blocks.{i}.hook_resid_mid" for i in range(2)] and bare.out_hooks == [f"blocks.{i}.hook_mlp_out" for i in range(2)]
    assert "hook_resid_mid" in bare.summary["source"]["notes"][0]


def test_resume_refuses_other_hooks_and_keeps_activations_apart(tmp_path):
    data, _ = planted_mlps(2000)
    kw = dict(tokens=10 * 128, batch_size=128, checkpoint_every=5 * 128, init_rows=128, keep_checkpoints=True)
    t = trainer(coder_cfg("crosscoder", tmp_path, name="o", **kw), data)
    t.fit()
    t.save()
    other = trainer(coder_cfg("crosscoder", tmp_path, name="o", activation="batchtopk", **kw), data)
    assert other.runs[0].paths.dir != t.runs[0].paths.dir  # another activation is another dictionary, in its own folder
    with pytest.raises(SaekitError, match="hooks"):  # the same folder over other hooks: refused, not resumed
        trainer(coder_cfg("crosscoder", tmp_path, name="o", hooks=[IN0, IN1], **kw), data).fit()


def test_crosscoder_l1_weighs_codes_by_the_sum_of_per_hook_decoder_norms():
    d, ins, outs = _random_coder("crosscoder", "relu")
    xn = torch.randn(30, 2 * D, generator=torch.Generator().manual_seed(9))
    out = d.training_forward(xn, l1_coef=0.7)
    f = d.pre_acts(xn).relu()
    w = d.W_dec[:, :D].norm(dim=-1) + d.W_dec[:, D:].norm(dim=-1)  # not the norm of the whole row
    assert torch.allclose(out.terms["l1"], (f * w).sum(-1).mean() / (2 * D))
    assert torch.allclose(out.loss, out.terms["mse"] + 0.7 * out.terms["l1"])


# --- data-parallel ----------------------------------------------------------------------------------------------

DDP_CASES = [("skip-transcoder", "topk"), ("clt", "batchtopk"), ("crosscoder", "relu")]


def _ddp_trainer(out, kind, act, rank=0, world=1):
    """Rank `rank` of `world` reads its share of each global batch of 256 rows."""
    from saekit import distributed

    data, _ = planted_mlps(4096)
    cfg = coder_cfg(kind, Path(out), name=f"{kind}-{world}", activation=act, tokens=256 * 20, batch_size=256, init_rows=512,
                    log_every=10, eval_tokens=0)
    glob = tensor_batches(data, 256, seed=0)
    part = 256 // world

    def source(start):
        for b in glob(start):
            yield {h: x[rank * part:(rank + 1) * part] for h, x in b.items()}

    hooks = {h: HookSource(x.shape[1], Provenance(hook=h)) for h, x in data.items()}
    return Trainer(cfg, hooks, source, progress=False, dist=distributed.current() if world > 1 else None, data_parallel=world > 1)


def _ddp_worker(rank, tmp):
    from safetensors.torch import save_file

    from saekit import distributed

    with distributed.session("cpu"):
        for kind, act in DDP_CASES:
            t = _ddp_trainer(tmp, kind, act, rank, 2)
            t.fit()
            save_file({k: v.contiguous() for k, v in t.runs[0].dictionary.state_dict().items()}, f"{tmp}/{kind}-rank{rank}.safetensors")


@pytest.mark.slow
def test_ddp_ranks_agree_and_match_one_process(tmp_path):
    from safetensors.torch import load_file

    from test_distributed import spawn

    spawn(_ddp_worker, str(tmp_path))
    for kind, act in DDP_CASES:
        w0, w1 = (load_file(str(tmp_path / f"{kind}-rank{r}.safetensors")) for r in (0, 1))
        assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0), kind
        one = _ddp_trainer(tmp_path, kind, act)
        one.fit()
        d = one.runs[0].dictionary
        ref = {k: v.clone() for k, v in d.state_dict().items()}
        data, _ = planted_mlps(4096)
        x, y = {h: data[h] for h in d.in_hooks}, torch.cat([data[h] for h in d.out_hooks], 1)
        with torch.no_grad():
            err_one = (torch.cat(list(d.predict(x).values()), 1) - y).pow(2).mean()
            d.load_state_dict(w0)
            err_ddp = (torch.cat(list(d.predict(x).values()), 1) - y).pow(2).mean()
        assert abs(err_ddp / err_one - 1) < 0.1, (kind, float(err_ddp), float(err_one))
        if act != "batchtopk":  # the same maths up to summation order (BatchTopK keeps the top k·B of each rank's half batch)
            for k, v in ref.items():
                assert (w0[k] - v).norm() / v.norm().clamp_min(1e-12) < 1e-3, (kind, k)


def test_clt_default_lr_follows_latents_per_layer(tmp_path):
    from saekit.train import default_lr

    data, _ = planted_mlps(500)
    t = trainer(coder_cfg("clt", tmp_path, lr=None, d_dict=96), data)
    assert t.runs[0].dictionary.train_config["lr"] == default_lr("clt", 48) > default_lr("clt", 96)


@pytest.mark.parametrize("kind", ["transcoder", "skip-transcoder", "crosscoder"])
def test_fused_topk_step_equals_autograd(kind, monkeypatch):
    """The CPU fused TopK step (TopKEncode, as TopKSAE's) gives the loss and gradients of the plain autograd step, AuxK included."""
    from saekit.dictionaries import build, fast
    from saekit.dictionaries.base import DictConfig, Provenance

    if fast._kernels() is None:
        pytest.skip("numba is not installed: there is no fused path to compare")
    d_in, d_out = 16, (16 if kind == "crosscoder" else 12)
    cfg = DictConfig(kind=kind, activation="topk", d_in=d_in, d_out=d_out, d_dict=64, k=4, in_widths=[d_in], out_widths=[d_out])
    d = build(cfg, Provenance(hook="a", in_hooks=["a"], out_hooks=["a" if kind == "crosscoder" else "b"]))
    d.reset_parameters(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(200, d_in, generator=g)
    y = None if kind == "crosscoder" else torch.randn(200, d_out, generator=g)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    results = []
    for step in ("fused", "autograd"):
        monkeypatch.setattr(fast, "_TOPK_STEP", step)
        d.zero_grad(set_to_none=True)
        out = d.training_forward(x, target=y, dead=dead, aux_k=8, aux_coef=0.5)
        out.loss.backward()
        results.append((out.loss.detach(), out.l0, out.fired, {n: p.grad.clone() for n, p in d.named_parameters()}))
    (l1, z1, f1, g1), (l2, z2, f2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-6) and torch.equal(f1, f2) and float(z1) == float(z2)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-5), name
