"""torchrun support: rank detection, the sharded store, and 2-process (gloo, CPU) harvest and DDP training.

The multi-process tests start two ranks with `torch.multiprocessing.spawn` and the same
environment variables torchrun sets; one test runs the real `torchrun -m saekit` command.
Every comparison is against a single-process run made in the same test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from saekit import distributed
from saekit.errors import SaekitError
from saekit.harvest import HarvestConfig, _rank_tokens, harvest
from saekit.store import (MANIFEST, ActivationStore, StoreWriter, check_existing, consolidate, gaps, progress_name,
                          verify)

CTX = 16
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch):
    """The test process itself is a single process, whatever launched pytest."""
    for v in TORCHRUN_VARS:
        monkeypatch.delenv(v, raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    import faulthandler

    faulthandler.dump_traceback_later(240, exit=True)  # a hang fails the test with the rank's stack, not a frozen CI
    fn(rank, *args)


def spawn(fn, *args, world: int = 2) -> None:
    """Run fn(rank, *args) in `world` processes joined like torchrun's (gloo on the CPU)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def hcfg(model_dir, text_file, out, **kw) -> HarvestConfig:
    base = dict(model=model_dir, hooks=HOOKS, data=text_file, context_size=CTX, tokens=CTX * 60,
                shard_tokens=CTX * 8, batch_size=4, out=str(out))
    return HarvestConfig(**(base | kw))


# --- rank detection -----------------------------------------------------------------------------------

def test_env_defaults_to_one_process():
    e = distributed.env()
    assert e == (0, 1, 0) and not e.distributed and e.is_main


def test_env_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    e = distributed.env()
    assert (e.rank, e.world_size, e.local_rank) == (3, 4, 1) and e.distributed and not e.is_main


@pytest.mark.parametrize("env, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not in 0..WORLD_SIZE-1"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
])
def test_env_refuses_bad_variables(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SaekitError, match=message):
        distributed.env()


def test_init_without_master_address_says_use_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SaekitError, match="MASTER_ADDR is not set; launch with torchrun"):
        distributed.init("cpu")


def test_device_choice():
    one, two = distributed.DistEnv(0, 1, 0), distributed.DistEnv(1, 2, 1)
    assert distributed.device("cpu", two) == torch.device("cpu")
    assert distributed.device("auto", one).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    if not torch.cuda.is_available():
        with pytest.raises(SaekitError, match="torch sees no GPU"):
            distributed.device("cuda", two)


def test_collectives_are_identities_alone():
    t = torch.arange(4.0)
    distributed.flat_all_reduce([t], "mean")
    distributed.broadcast_tensors([t])
    distributed.barrier()
    distributed.agree(None)
    assert t.tolist() == [0, 1, 2, 3] and distributed.all_gather_object(5) == [5]
    assert distributed.all_gather_cat(t) is t
    with pytest.raises(SaekitError, match="boom"):
        distributed.agree("boom")


# --- the sharded store ----------------------------------------------------------------------------------

def test_rank_owns_every_world_th_shard():
    # 60 sequences in shards of 8: shards 0..7, the last holding 4; rank 1 of 2 owns shards 1, 3, 5, 7.
    assert _rank_tokens(60, 8, 1, 2) == 8 + 8 + 8 + 4
    assert sum(_rank_tokens(60, 8, r, 3) for r in range(3)) == 60
    assert _rank_tokens(5, 8, 1, 2) == 0


def _spec(width=3):
    from saekit.models import HookSpec

    return HookSpec("h", 0, (width,))


def _fake_writer(path, **kw):
    model = {"name": "m", "fingerprint": "f", "d_model": 3, "n_layers": 1, "n_ctx": 4, "d_vocab": 50}
    header = {"model": model, "config_hash": "x", "rows": {"exclude_bos": True}}
    return StoreWriter(path, header=header, hooks=[_spec()], context_size=4, dtype="float32", shard_seqs=2, **kw)


def _seqs(start, n):
    toks = np.arange(start * 4, (start + n) * 4, dtype=np.int32).reshape(n, 4)
    return toks, {"h": torch.from_numpy(toks).float()[..., None].repeat(1, 1, 3)}


def test_ranks_write_their_own_shards_and_rank0_consolidates(tmp_path):
    """Two writers (ranks) fill shards 0,2 and 1; the consolidated store reads like one written in order."""
    out = tmp_path / "s"
    _fake_writer(out).abort()  # rank 0's header manifest
    w0 = _fake_writer(out, progress_file=progress_name(0), clean=False)
    w1 = _fake_writer(out, progress_file=progress_name(1), clean=False)
    w0.write(*_seqs(0, 2), start=0)
    w1.write(*_seqs(2, 2), start=2)
    w0.write(*_seqs(4, 1), start=4)  # the short last shard
    w0.close()
    w1.close()
    assert json.loads((out / MANIFEST).read_text())["shards"] == []  # ranks never touch the manifest
    m = consolidate(out, complete=True)
    assert [s["file"] for s in m["shards"]] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert m["complete"] and not list(out.glob("progress-rank-*")) and verify(out) == []
    store = ActivationStore(out)
    assert np.array_equal(store.read_tokens(0, 5), np.arange(20).reshape(5, 4))
    assert store.stats("h")["count"] == 5 * 3  # BOS column excluded


def test_gaps_are_refused_by_reader_and_by_consolidate(tmp_path):
    out = tmp_path / "s"
    _fake_writer(out).abort()
    w1 = _fake_writer(out, progress_file=progress_name(1), clean=False)
    w1.write(*_seqs(2, 2), start=2)
    w1.close()
    with pytest.raises(SaekitError, match=r"shard\(s\) 0 missing; rerun the same harvest command"):
        consolidate(out, complete=True)
    m = consolidate(out, complete=False)  # what a resumed rank 0 does first: keep the finished shard
    assert [s["file"] for s in m["shards"]] == ["shard-00001.h5"] and gaps(m["shards"])
    with pytest.raises(SaekitError, match="distributed harvest stopped early; rerun"):
        ActivationStore(out)


def test_progress_files_count_as_finished_for_resume(tmp_path):
    out = tmp_path / "s"
    _fake_writer(out).abort()
    w1 = _fake_writer(out, progress_file=progress_name(1), clean=False)
    w1.write(*_seqs(2, 2), start=2)
    w1.close()
    resume = check_existing(out, {}, "x")
    assert [s["file"] for s in resume["shards"]] == ["shard-00001.h5"]
    with pytest.raises(SaekitError, match="different config"):
        check_existing(out, {}, "y")


def test_write_must_start_at_a_shard_boundary(tmp_path):
    w = _fake_writer(tmp_path / "s")
    w.write(*_seqs(1, 1), start=1)
    with pytest.raises(RuntimeError, match="not at a shard boundary"):
        w.close()


# --- 2-process harvest ------------------------------------------------------------------------------------

def _harvest_worker(rank, cfg, killed_cfg, fail_rank1_after):
    """Harvest `cfg` with both ranks; then `killed_cfg`, during which rank 1 dies after some forwards."""
    import saekit.harvest as hv

    harvest(cfg, progress=False)
    if rank == 1:
        calls = {"n": 0}
        real = hv.capture

        def capture(*a, **k):
            calls["n"] += 1
            if calls["n"] > fail_rank1_after:
                raise RuntimeError("rank 1 killed")
            return real(*a, **k)

        hv.capture = capture
    harvest(killed_cfg, progress=False)


def _rows(path) -> tuple[list[bytes], dict[str, np.ndarray]]:
    """Sequences as (sorted token rows, acts in that order): the store as a set of sequences."""
    s = ActivationStore(path)
    toks = s.read_tokens(0, s.n_sequences)
    order = sorted(range(len(toks)), key=lambda i: toks[i].tobytes())
    return [toks[i].tobytes() for i in order], {h: s.read_acts(h, 0, s.n_sequences)[order] for h in s.hooks}


@pytest.mark.slow
def test_two_process_harvest_equals_single_process_and_resumes(tiny_model_dir, tiny_text_file, tmp_path):
    one = harvest(hcfg(tiny_model_dir, tiny_text_file, tmp_path / "one"), progress=False)
    # Rank 1 dies in its third shard of the second harvest (2 forwards per shard); the spawn then fails.
    with pytest.raises(mp.ProcessRaisedException):  # rank 1 raised, or rank 0 saw its peer vanish
        spawn(_harvest_worker, hcfg(tiny_model_dir, tiny_text_file, tmp_path / "two"),
              hcfg(tiny_model_dir, tiny_text_file, tmp_path / "killed"), 4)

    assert verify(tmp_path / "two") == [] and ActivationStore(tmp_path / "two").complete
    toks1, acts1 = _rows(one)
    toks2, acts2 = _rows(tmp_path / "two")
    assert len(toks1) == 60 and toks1 == toks2  # the same set of sequences...
    for h in HOOKS:
        np.testing.assert_array_equal(acts1[h], acts2[h])  # ...with the same activations (same batches, same CPU)
    m1, m2 = (json.loads((p / MANIFEST).read_text()) for p in (one, tmp_path / "two"))
    assert m1["stats"] == m2["stats"] and m1["shards"] == m2["shards"]  # shard for shard the same files
    assert not list((tmp_path / "two").glob("progress-rank-*"))

    # The killed run: one process (another world size) finishes what is missing.
    assert list((tmp_path / "killed").glob("progress-rank-*"))  # rank 1 listed the shards it finished
    assert not json.loads((tmp_path / "killed" / MANIFEST).read_text())["complete"]
    harvest(hcfg(tiny_model_dir, tiny_text_file, tmp_path / "killed"), progress=False)
    m3 = json.loads((tmp_path / "killed" / MANIFEST).read_text())
    assert m3["complete"] and m3["shards"] == m1["shards"] and m3["stats"] == m1["stats"]


# --- 2-process training -----------------------------------------------------------------------------------

D_IN, GLOBAL_BATCH = 16, 256


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(32, D_IN, generator=g)
    codes = torch.rand(4096, 32, generator=g) * (torch.rand(4096, 32, generator=g) < 0.1)
    return codes @ atoms


def _tcfg(out, kind, **kw):
    from saekit.train import TrainConfig
    from saekit.config import from_flags

    base = dict(kind=kind, d_dict=48, k=[3], l1=[1.0], tokens=GLOBAL_BATCH * 40, batch_size=GLOBAL_BATCH, lr=3e-3,
                dead_tokens=10**9, init_rows=512, log_every=10, checkpoint_every=0, replace_every=10, out=str(out),
                device="cpu", eval_tokens=0)
    return from_flags(TrainConfig, **(base | kw))


KINDS_EXACT = {"relu": {}, "topk": {}, "batchtopk": {}, "codebook": {"dead_tokens": 512, "d_dict": 64}}


def _trainer(out, kind, rank=0, world=1):
    """A Trainer whose rank `rank` of `world` reads rows [rank·B/world, (rank+1)·B/world) of each global batch."""
    from saekit.dictionaries import Provenance
    from saekit.train import HookSource, Trainer, tensor_batches

    cfg = _tcfg(out, kind, **KINDS_EXACT[kind])
    glob = tensor_batches({"h": _data()}, GLOBAL_BATCH, seed=0)
    part = GLOBAL_BATCH // world

    def source(start):
        for b in glob(start):
            yield {"h": b["h"][rank * part:(rank + 1) * part]}

    return Trainer(cfg, {"h": HookSource(D_IN, Provenance(hook="h"))}, source, progress=False,
                   dist=distributed.current() if world > 1 else None, data_parallel=world > 1)


def _trainer_worker(rank, tmp, kinds):
    """Trainer level: each kind trained by both ranks on halves of the same global batches; weights saved per rank."""
    with distributed.session("cpu"):
        for kind in kinds:
            t = _trainer(Path(tmp) / f"ddp-{kind}", kind, rank, 2)
            t.fit()
            state = {k: v.contiguous() for k, v in t.runs[0].dictionary.state_dict().items()}
            save_file(state, str(Path(tmp) / f"{kind}-rank{rank}.safetensors"))


STORE_TRAIN = dict(hooks=["all"], kind="topk", k=[4], d_dict=64, batch_size=128, tokens=128 * 30, lr=3e-3,
                   init_rows=256, device="cpu", eval_tokens=10_000, log_every=10)


def _store_worker(rank, tmp, store):
    """Store level: placement data uninterrupted, the same stopped halfway and resumed, and placement hooks."""
    from saekit.train import TrainConfig, train
    from saekit.config import from_flags

    base = STORE_TRAIN | {"store": store, "checkpoint_every": 128 * 15}
    with distributed.session("cpu"):
        paths = train(from_flags(TrainConfig, **base, out=f"{tmp}/data"), progress=False)
        train(from_flags(TrainConfig, **(base | {"tokens": 128 * 15, "keep_checkpoints": True}), out=f"{tmp}/resumed"), progress=False)
        train(from_flags(TrainConfig, **base, out=f"{tmp}/resumed", resume=True), progress=False)
        hooks = train(from_flags(TrainConfig, **base, out=f"{tmp}/hooks", placement="hooks"), progress=False)
    (Path(tmp) / f"paths-rank{rank}.json").write_text(json.dumps([[str(p) for p in paths], [str(p) for p in hooks]]))


@pytest.fixture(scope="module")
def small_store(tiny_model_dir, tiny_text_file, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("store") / "s"
    return str(harvest(hcfg(tiny_model_dir, tiny_text_file, out, tokens=CTX * 120, shard_tokens=CTX * 16), progress=False))


@pytest.mark.slow
def test_ddp_ranks_agree_and_match_one_process(tmp_path):
    """Both ranks end with the same weights; close to one process taking the same global batches."""
    kinds = list(KINDS_EXACT)
    spawn(_trainer_worker, str(tmp_path), kinds)
    x = _data()
    for kind in kinds:
        w0, w1 = (load_file(str(tmp_path / f"{kind}-rank{r}.safetensors")) for r in (0, 1))
        assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0), kind
        single = _trainer(tmp_path / f"single-{kind}", kind)
        single.fit()
        d = single.runs[0].dictionary
        ref = {k: v.clone() for k, v in d.state_dict().items()}
        with torch.no_grad():
            mse_single = (d.decode(d.encode(x)) - x).pow(2).mean()
            d.load_state_dict(w0)
            mse_ddp = (d.decode(d.encode(x)) - x).pow(2).mean()
        assert abs(mse_ddp / mse_single - 1) < 0.1, (kind, float(mse_ddp), float(mse_single))
        if kind in ("relu", "topk"):
            # The same maths up to float summation order (the init sees the union of the ranks' samples).
            # Not checked weight by weight: BatchTopK keeps the top k·B of each rank's half batch, and
            # codebook k-means sees the sample in another order (its codes come out permuted).
            for k, v in ref.items():
                err = (w0[k] - v).norm() / v.norm().clamp_min(1e-12)
                assert err < 1e-3, (kind, k, float(err))


@pytest.mark.slow
def test_ddp_store_training_resume_and_hook_placement(small_store, tmp_path):
    from saekit.interop import load
    from saekit.train import TrainConfig, train
    from saekit.config import from_flags

    spawn(_store_worker, str(tmp_path), small_store)
    paths0, hooks0 = json.loads((tmp_path / "paths-rank0.json").read_text())
    assert json.loads((tmp_path / "paths-rank1.json").read_text()) == [paths0, hooks0]  # every rank returns all
    assert sorted(paths0) == sorted(p.replace("/hooks/", "/data/") for p in hooks0)
    single = train(from_flags(TrainConfig, **STORE_TRAIN, store=small_store, checkpoint_every=0, out=str(tmp_path / "single")),
                   progress=False)
    assert len(single) == 2
    for p_single in single:
        rel = p_single.relative_to(tmp_path / "single")
        d_single = load(p_single)
        for variant in ("data", "hooks", "resumed"):  # the single-process format, file for file
            p = tmp_path / variant / rel
            assert sorted(os.listdir(p)) == sorted(os.listdir(p_single))
            assert json.loads((p / "config.json").read_text()).keys() == json.loads((p_single / "config.json").read_text()).keys()
            d = load(p)
            assert {k: v.shape for k, v in d.state_dict().items()} == {k: v.shape for k, v in d_single.state_dict().items()}
        # Stopped halfway and resumed under torchrun == uninterrupted.
        ddp, resumed = (load(tmp_path / v / rel) for v in ("data", "resumed"))
        assert all(torch.equal(a, b) for a, b in zip(ddp.state_dict().values(), resumed.state_dict().values()))
        # Other batches than one process (each rank its half of the store), same recipe: the same quality.
        for variant in ("data", "hooks"):
            fvu = load(tmp_path / variant / rel).summary["fvu"]
            assert abs(fvu - d_single.summary["fvu"]) < 0.1, (variant, fvu, d_single.summary["fvu"])
        steps = [json.loads(ln)["step"] for ln in (tmp_path / "data" / rel / "metrics.jsonl").read_text().splitlines()]
        assert steps == [10, 20, 30]  # written once, by rank 0


@pytest.mark.slow
@pytest.mark.parametrize("kw, message", [
    ({"batch_size": 255}, "--batch-size 255 is the global batch and must divide by the 2 processes; pass --batch-size 254"),
    ({"placement": "hooks", "hooks": ["blocks.0.hook_resid_post"]}, "--placement hooks with 2 processes but 1 hook"),
])
def test_refusals_under_two_ranks(small_store, tmp_path, monkeypatch, kw, message):
    """Checked before any collective, so every rank refuses alike (here: rank 1 of 2, no group needed)."""
    from saekit.train import TrainConfig, train
    from saekit.config import from_flags

    fake = distributed.DistEnv(1, 2, 1)
    monkeypatch.setattr(distributed, "env", lambda: fake)
    monkeypatch.setattr(distributed, "init", lambda dev="cpu": fake)
    with pytest.raises(SaekitError, match=message.replace("(", r"\(")):
        train(from_flags(TrainConfig, **({"store": small_store, "tokens": 256, "device": "cpu", "out": str(tmp_path)} | kw)), progress=False)


# --- the real command -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_cli_harvest_then_verify(tiny_model_dir, tiny_text_file, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    args = ["--model", tiny_model_dir, "--data", tiny_text_file, "--hooks", ",".join(HOOKS), "--context-size", str(CTX),
            "--tokens", str(CTX * 40), "--shard-tokens", str(CTX * 8), "--batch-size", "4", "--out", str(tmp_path / "s")]
    r = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "saekit", "harvest", *args],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("activation store") == 1  # rank 0 prints the summary, rank 1 stays quiet
    v = subprocess.run([sys.executable, "-m", "saekit", "info", str(tmp_path / "s"), "--verify"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and "checksums: all shards ok" in v.stdout, v.stderr
    assert ActivationStore(tmp_path / "s").n_sequences == 40
