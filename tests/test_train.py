"""The trainer: planted-dictionary recovery per kind, resume == uninterrupted, sweeps on shared batches,
NaN handling, errors, and store-driven end-to-end runs (library and CLI)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from saekit.dictionaries import DictConfig, Provenance
from saekit.interop import load
from saekit.errors import SaekitError
from saekit.runs import run_name, run_paths
from saekit.train import HookSource, TrainConfig, Trainer, tensor_batches
from saekit.config import from_flags

D_IN, N_ATOMS, K_TRUE = 16, 24, 2


def planted(n, seed=0, binary=False):
    """Rows that are k-sparse combinations of N_ATOMS known unit vectors (fixed atoms, seed picks the rows)."""
    A = torch.randn(N_ATOMS, D_IN, generator=torch.Generator().manual_seed(1234))
    A = A / A.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, N_ATOMS, generator=g).topk(K_TRUE, dim=-1).indices
    c = torch.ones(n, K_TRUE) if binary else 0.5 + torch.rand(n, K_TRUE, generator=g)
    return torch.zeros(n, N_ATOMS).scatter(1, idx, c) @ A, A


def trainer(tmp_path, data, *, name="out", scale=1.0, **kw):
    base = dict(kind="topk", d_dict=48, k=[K_TRUE], tokens=40_000, batch_size=256, lr=3e-3, dead_tokens=5_000,
                init_rows=1024, log_every=10, checkpoint_every=0, out=str(tmp_path / name), device="cpu")
    cfg = from_flags(TrainConfig, **(base | kw))
    hooks = {h: HookSource(x.shape[1], Provenance(hook=h, scale=scale)) for h, x in data.items()}
    return Trainer(cfg, hooks, tensor_batches(data, cfg.batch_size, cfg.seed), progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


# --- learning ----------------------------------------------------------------------------------------

KIND_SETTINGS = {
    "relu": dict(l1=[1.0], tokens=80_000),
    "topk": dict(tokens=150_000),
    "batchtopk": dict(tokens=150_000, lr=1e-2),
    "codebook": dict(tokens=80_000, replace_every=20, d_dict=32),
}


@pytest.mark.parametrize("kind", list(KIND_SETTINGS))
def test_learns_planted_dictionary(kind, tmp_path):
    binary = kind == "codebook"  # a codebook sums fixed code vectors: plant fixed coefficients
    x, A = planted(20_000, binary=binary)
    # a scale != 1 checks that training happens in normalised space and decode undoes it
    t = trainer(tmp_path, {"h": x / 3.0}, kind=kind, scale=3.0, **KIND_SETTINGS[kind])
    t.fit()
    x_eval, _ = planted(2000, seed=1, binary=binary)
    s = t.evaluate([{"h": x_eval / 3.0}], 2000)["h/" + run_name(kind, K_TRUE, KIND_SETTINGS[kind].get("l1", [0])[0])]
    W = F.normalize(t.runs[0].dictionary.directions(), dim=-1)
    best = (A @ W.T).max(1).values  # (N_ATOMS,) best cosine of each true atom
    assert (best > 0.9).float().mean() >= 0.9, best
    # FVU of the planted data; relu pays for its L1 shrinkage, the others should be near exact
    assert s["fvu"] < (0.35 if kind == "relu" else 0.15), s
    if kind != "relu":
        assert s["l0"] == pytest.approx(K_TRUE, rel=0.25)


# --- resume ---------------------------------------------------------------------------------------------

class Killed(Exception):
    pass


def killing(source, at):
    """A batch source that dies when batch index `at` is requested (as a killed process would)."""

    def src(start=0):
        i = start
        for b in source(start):
            if i == at:
                raise Killed
            i += 1
            yield b

    return src


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "codebook"])
def test_resume_equals_uninterrupted(kind, tmp_path):
    x, _ = planted(3000, binary=kind == "codebook")
    kw = dict(kind=kind, tokens=30 * 128, batch_size=128, checkpoint_every=10 * 128, log_every=5, init_rows=256,
              dead_tokens=600, replace_every=4, l1=[1.0])
    full = trainer(tmp_path, {"h": x}, name="full", **kw)
    full.fit()

    t1 = trainer(tmp_path, {"h": x}, name="cut", **kw)
    t1.batches = killing(t1.batches, 23)
    with pytest.raises(Killed):
        t1.fit()
    paths = t1.runs[0].paths
    assert paths.checkpoint_steps() == [10, 20]
    t2 = trainer(tmp_path, {"h": x}, name="cut", resume=True, **kw)
    t2.fit()
    assert t2.step == 30
    a, b = full.runs[0], t2.runs[0]
    for (k, va), (_, vb) in zip(a.dictionary.state_dict().items(), b.dictionary.state_dict().items()):
        assert torch.equal(va, vb), k
    assert torch.equal(a.since_fired, b.since_fired)
    # the metrics log has each step once, as if never stopped
    steps = [json.loads(ln)["step"] for ln in paths.metrics.read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]
    full_rows = [json.loads(ln) for ln in full.runs[0].paths.metrics.read_text().splitlines()]
    cut_rows = [json.loads(ln) for ln in paths.metrics.read_text().splitlines()]
    assert [r["loss"] for r in full_rows] == [r["loss"] for r in cut_rows]


def test_resume_refuses_changed_settings_and_overwrite(tmp_path):
    x, _ = planted(2000)
    kw = dict(tokens=10 * 128, batch_size=128, checkpoint_every=5 * 128, init_rows=128)
    done = trainer(tmp_path, {"h": x}, **kw)
    done.fit()
    done.save()
    assert not done.runs[0].paths.checkpoints.exists()  # removed once the dictionary is written
    with pytest.raises(SaekitError, match="already holds a finished dictionary"):
        trainer(tmp_path, {"h": x}, **kw).fit()
    # With its checkpoints kept, a rerun resumes, and refuses other settings, naming them.
    kept = trainer(tmp_path, {"h": x}, name="kept", keep_checkpoints=True, **kw)
    kept.fit()
    kept.save()
    assert kept.runs[0].paths.checkpoint_steps() == [5, 10]
    with pytest.raises(SaekitError, match="seed"):
        trainer(tmp_path, {"h": x}, name="kept", **(kw | {"seed": 1})).fit()


def test_default_budget_is_passes_over_the_train_split():
    from saekit.train import DEFAULT_TOKENS, resolve_tokens

    cfg = from_flags(TrainConfig, out="o", batch_size=256)
    assert resolve_tokens(cfg, 30_000).tokens == 300_000  # 10 passes
    assert resolve_tokens(cfg, 20_000_000).tokens == 20_000_000  # capped at 10M tokens, but at least one pass
    assert resolve_tokens(cfg, 2_000_000).tokens == DEFAULT_TOKENS
    assert resolve_tokens(from_flags(TrainConfig, out="o", passes=2.5), 40_000).tokens == 100_000
    with pytest.warns(UserWarning, match="passes over the store's 1,000 training rows"):
        assert resolve_tokens(from_flags(TrainConfig, out="o", tokens=100_000), 1_000).tokens == 100_000


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    x, _ = planted(4000)
    t = trainer(tmp_path, {"h": x}, tokens=20 * 128, batch_size=128, checkpoint_every=5 * 128, log_every=5, init_rows=128)
    good = t.batches

    def poisoned(start=0):
        for i, b in enumerate(good(start), start):
            yield {h: v.clone().fill_(float("nan")) for h, v in b.items()} if i == 7 else b

    t.batches = poisoned
    with pytest.raises(SaekitError, match=r"NaN/inf at step 7;.*step-00000005 kept"):
        t.fit()
    assert t.runs[0].paths.checkpoint_steps() == [5]


# --- sweeps ------------------------------------------------------------------------------------------

def test_sweep_and_hooks_share_one_stream(tmp_path):
    xa, _ = planted(3000)
    xb = torch.randn(3000, 8)
    pulled = []

    def counting(source):
        def src(start=0):
            for b in source(start):
                pulled.append(b)
                yield b
        return src

    t = trainer(tmp_path, {"a": xa, "b": xb}, k=[2, 3], d_dict=24, tokens=12 * 128, batch_size=128, init_rows=128)
    t.batches = counting(t.batches)
    t.fit()
    assert len(t.runs) == 4
    assert len(pulled) == 12 + 1  # every step's batch read once for all 4 dictionaries (+1 for the init sample)
    paths = t.save(t.evaluate([{"a": xa[:500], "b": xb[:500]}], 500))
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in paths) == ["a/topk-k2", "a/topk-k3", "b/topk-k2", "b/topk-k3"]
    for p in paths:
        d = load(p)
        assert d.summary["train_steps"] == 12 and d.summary["eval_tokens"] == 500
        assert (p / "metrics.jsonl").read_text().count("\n") == 2  # steps 10 and 12
        assert d.train_config["k"] == [2, 3]
    assert run_paths(tmp_path / "out", "a", "topk-k2").dir == paths[0]


def test_config_errors():
    with pytest.raises(ValueError, match="k=64 must be smaller than d_dict=64"):
        TrainConfig(arch=DictConfig(d_dict=64), k=[16, 64])
    from saekit.config import from_dict

    with pytest.raises(SaekitError, match="did you mean batch_size"):
        from_dict(TrainConfig, {"batchsize": 4})
    cfg = from_dict(TrainConfig, {"k": "16,32,64", "hooks": "a,b"})
    assert cfg.k == [16, 32, 64] and cfg.hooks == ["a", "b"]


def test_k_too_large_for_hook_width(tmp_path):
    with pytest.raises(SaekitError, match="k=20 must be smaller"):
        trainer(tmp_path, {"h": torch.randn(100, 4)}, d_dict=0, expansion=4, k=[20])


# --- from a store ------------------------------------------------------------------------------------

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def store_dir(tiny_model_dir, tiny_text_file, tmp_path_factory):
    from saekit.harvest import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("store") / "s"
    cfg = HarvestConfig(model=tiny_model_dir, hooks=[HOOK, "blocks.1.hook_mlp_out"], data=tiny_text_file,
                        context_size=32, tokens=6000, batch_size=16, out=str(out), holdout=0.1, shard_tokens=2048)
    return str(harvest(cfg, progress=False))


def test_store_end_to_end_and_resume(store_dir, tmp_path):
    from saekit.store import ActivationStore
    from saekit.train import train

    st = ActivationStore(store_dir)
    common = dict(store=store_dir, hooks=["all"], kind="topk", d_dict=64, k=[4, 8], batch_size=256,
                  buffer_rows=1024, checkpoint_every=256 * 4, init_rows=256, eval_tokens=300, device="cpu")
    paths = train(from_flags(TrainConfig, **common, tokens=256 * 10, out=str(tmp_path / "full")), progress=False)
    assert len(paths) == 4
    for p in paths:
        d = load(p)
        hook = d.prov.hook
        assert d.prov.scale == pytest.approx(st.stats(hook)["scale"], rel=1e-6)
        assert d.prov.model == st.model.to_dict() and d.prov.store == store_dir
        s = d.summary
        assert s["eval_tokens"] == 300 and 0 <= s["fvu"] < 1 and s["l0"] <= d.cfg.k
        x = torch.from_numpy(st.read_acts(hook, st.split("eval").start, st.split("eval").start + 2)).reshape(-1, d.cfg.d_in)
        assert d(x).x_hat.shape == x.shape
    # a run stopped at 6 steps and resumed to 10 reads the batches 6..9 the uninterrupted run read
    train(from_flags(TrainConfig, **common, tokens=256 * 6, out=str(tmp_path / "cut"), keep_checkpoints=True), progress=False)  # kept: to train on
    resumed = train(from_flags(TrainConfig, **common, tokens=256 * 10, out=str(tmp_path / "cut"), resume=True), progress=False)
    for a, b in zip(paths, resumed):
        sa, sb = load(a).state_dict(), load(b).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_store_errors(store_dir, tmp_path):
    from saekit.train import train

    with pytest.raises(SaekitError, match=r"hook 'blocks.0.hook_resid_pre' is not in store.*did you mean blocks.0.hook_resid_post.*hooks present"):
        train(from_flags(TrainConfig, store=store_dir, hooks=["blocks.0.hook_resid_pre"], out=str(tmp_path / "o")), progress=False)
    with pytest.raises(SaekitError, match="does not exist"):
        train(from_flags(TrainConfig, store=str(tmp_path / "nope"), out=str(tmp_path / "o")), progress=False)
    with pytest.raises(SaekitError, match="k=40 must be smaller than the number of latents"):
        train(from_flags(TrainConfig, store=store_dir, hooks=[HOOK], expansion=1, k=[4, 40], out=str(tmp_path / "o")), progress=False)


@pytest.mark.slow
def test_cli_train_and_errors(store_dir, tmp_path):
    import os

    exe = [sys.executable, "-m", "saekit_cli.main"]
    env = os.environ | {"COLUMNS": "200"}
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'store = "{store_dir}"\nkind = "codebook"\nk = [2]\nd_dict = 64\ngroups = 2\n'
                   f'tokens = 1024\nbatch_size = 256\nbuffer_rows = 1024\ninit_rows = 256\neval_tokens = 200\n')
    r = subprocess.run(exe + ["train", "--config", str(cfg), "--hook", HOOK, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    d = load(tmp_path / "o" / HOOK / "codebook-k2-g2")
    assert d.cfg.groups == 2 and d.summary["eval_tokens"] == 200
    assert "codebook-k2-g2" in r.stdout
    r = subprocess.run(exe + ["train", "--store", store_dir, "--hook", "nope", "--out", str(tmp_path / "p")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: hook 'nope' is not in store") and "Traceback" not in r.stderr
    cfg.write_text(f'store = "{store_dir}"\nbatchsize = 3\n')
    r = subprocess.run(exe + ["train", "--config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "did you mean batch_size" in r.stderr


def test_config_json_records_the_values_used(tmp_path):
    """Automatic settings (lr 0, d_dict 0, aux_k 0) are saved resolved; knobs of other kinds are None."""
    x, _ = planted(1000)
    t = trainer(tmp_path, {"h": x}, tokens=2 * 128, batch_size=128, init_rows=128, lr=None, d_dict=0, expansion=2, aux_k=0)
    t.fit()
    d = load(t.save()[0])
    used = d.train_config
    assert used["arch"]["d_dict"] == 2 * D_IN == d.cfg.d_dict
    assert used["arch"] == dataclasses.asdict(d.cfg)  # the nested architecture is the dictionary's own
    assert used["lr"] == pytest.approx(2e-4 / (2 * D_IN / 2**14) ** 0.5)
    assert used["aux_k"] == D_IN // 2
    assert used["l1"] is None and used["k"] == [K_TRUE]
    relu = trainer(tmp_path, {"h": x}, name="relu", kind="relu", tokens=2 * 128, batch_size=128, init_rows=128)
    relu.fit()
    used = load(relu.save()[0]).train_config
    assert used["l1"] == [1.0] and used["k"] is None and used["aux_k"] is None


def test_resume_skips_a_damaged_checkpoint(tmp_path):
    """The newest checkpoint fails its checksum: a warning names it and the run resumes from the one before."""
    from saekit import runs

    x, _ = planted(3000)
    kw = dict(tokens=30 * 128, batch_size=128, checkpoint_every=10 * 128, log_every=5, init_rows=256)
    full = trainer(tmp_path, {"h": x}, name="full", **kw)
    full.fit()
    t1 = trainer(tmp_path, {"h": x}, name="cut", **kw)
    t1.batches = killing(t1.batches, 23)
    with pytest.raises(Killed):
        t1.fit()
    paths = t1.runs[0].paths
    f = paths.checkpoint(20) / runs.STATE_TENSORS
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    t2 = trainer(tmp_path, {"h": x}, name="cut", resume=True, **kw)
    with pytest.warns(UserWarning, match="step-00000020 is damaged"):
        t2.fit()
    assert t2.step == 30
    for (k, va), (_, vb) in zip(full.runs[0].dictionary.state_dict().items(), t2.runs[0].dictionary.state_dict().items()):
        assert torch.equal(va, vb), k
    steps = [json.loads(ln)["step"] for ln in paths.metrics.read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_resume_warns_of_a_checkpoint_with_the_old_batch_order(tmp_path):
    """A checkpoint from the loader that kept rows in permuted order inside a batch resumes, with a warning saying
    the run is not bit-identical to one the earlier version would finish; a current checkpoint resumes silently."""
    import warnings

    from saekit import runs

    x, _ = planted(3000)
    kw = dict(tokens=30 * 128, batch_size=128, checkpoint_every=10 * 128, log_every=5, init_rows=256)
    t1 = trainer(tmp_path, {"h": x}, name="cut", **kw)
    t1.batches = killing(t1.batches, 23)
    with pytest.raises(Killed):
        t1.fit()
    state = t1.runs[0].paths.checkpoint(20) / runs.STATE_JSON
    meta = json.loads(state.read_text())
    assert meta["batch_order"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current order: no warning
        trainer(tmp_path, {"h": x}, name="cut", resume=True, **kw)._load_checkpoint([20])
    del meta["batch_order"]  # as written before the order changed
    state.write_text(json.dumps(meta))
    t2 = trainer(tmp_path, {"h": x}, name="cut", resume=True, **kw)
    with pytest.warns(UserWarning, match="same rows in another order"):
        t2.fit()
    assert t2.step == 30


def test_data_init_sample_spreads_over_the_batches_it_reads(tmp_path, monkeypatch):
    """With init_rows below the batch size the sample is spread over the batch, not its first rows: the loader
    keeps a batch's rows in buffer order, so its head would be a few sequences only."""
    n, d = 512, 6
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, d)  # row i holds i: the sample says where it came from
    t = trainer(tmp_path, {"h": x}, batch_size=n, init_rows=64, tokens=n)
    t.batches = lambda start=0: iter([{"h": x}] * 4)  # one batch in buffer order
    seen = []
    monkeypatch.setattr(type(t.runs[0].dictionary), "init_from_data", lambda self, xs, **kw: seen.append(xs[:, 0].clone()))
    t._init_from_data()
    rows = seen[0]
    assert len(rows) == 64 and rows.min() == 0 and rows.max() == n - 1  # from the whole batch
    assert torch.all(rows.diff() > 0)
