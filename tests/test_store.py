"""The activation store without a model: synthetic activations whose values name their row.

Hook "a" holds the row's global id (seq·ctx + pos) in dimension 0, so every batch can be
traced back to the rows it came from; hook "b" is 2·a[:, :3] + 1, so batches of several
hooks can be checked to hold the same rows.
"""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch

from saekit.errors import SaekitError
from saekit.models import HookSpec, ModelInfo
from saekit.store import (
    MANIFEST,
    ActivationStore,
    StoreWriter,
    check_existing,
    from_stored,
    row_mask,
    to_stored,
    verify,
)

CTX = 8


def synthetic(n_seq, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 50, (n_seq, CTX)).astype(np.int32)
    tokens[:, 0] = 0
    for s in range(0, n_seq, 3):  # every third sequence padded after a random length
        tokens[s, rng.integers(2, CTX) :] = -1
    a = rng.standard_normal((n_seq, CTX, 6)).astype(np.float32)
    a[..., 0] = np.arange(n_seq * CTX).reshape(n_seq, CTX)
    b = 2 * a[..., :3] + 1
    return tokens, {"a": a, "b": b}


def make_store(path, n_seq=40, shard_seqs=7, dtype="float32", holdout=0.1, write_seqs=5, seed=0):
    tokens, acts = synthetic(n_seq, seed)
    header = {
        "model": ModelInfo("synthetic", "0" * 16, 6, 1, CTX, 50).to_dict(),
        "bos_id": 0,
        "rows": {"exclude_bos": True, "pad_token": -1},
        "config": {"seed": seed},
        "config_hash": f"hash{seed}",
        "holdout": {"fraction": holdout},
    }
    hooks = [HookSpec("a", 0, [6]), HookSpec("b", 0, [3])]
    w = StoreWriter(path, header=header, hooks=hooks, context_size=CTX, dtype=dtype, shard_seqs=shard_seqs)
    for s in range(0, n_seq, write_seqs):
        w.write(tokens[s : s + write_seqs], {k: torch.from_numpy(v[s : s + write_seqs]) for k, v in acts.items()})
    w.close()
    return tokens, acts


@pytest.fixture
def store(tmp_path):
    tokens, acts = make_store(tmp_path / "s")
    return ActivationStore(tmp_path / "s"), tokens, acts


def test_roundtrip_across_shards(store):
    st, tokens, acts = store
    assert st.n_sequences == 40 and len(st.manifest["shards"]) == 6  # 7,7,7,7,7,5
    assert [s["n_seq"] for s in st.manifest["shards"]] == [7, 7, 7, 7, 7, 5]
    np.testing.assert_array_equal(st.read_tokens(5, 23), tokens[5:23])
    np.testing.assert_array_equal(st.read_acts("a", 5, 23), acts["a"][5:23])
    np.testing.assert_array_equal(st.read_acts("b", 0, 40), acts["b"])
    assert st.hook_width("a") == 6 and st.hook_shape("b") == [3]
    assert st.n_tokens == int((tokens != -1).sum())
    assert st.n_rows == int(row_mask(tokens).sum())
    with pytest.raises(SaekitError, match="no hook 'c'"):
        st.read_acts("c", 0, 1)
    with pytest.raises(SaekitError, match="outside"):
        st.read_tokens(0, 41)


def test_stats_match_numpy(store):
    st, tokens, acts = store
    mask = row_mask(tokens)
    for h in ("a", "b"):
        rows = acts[h][mask].astype(np.float64)
        s = st.stats(h)
        assert s["count"] == len(rows)
        np.testing.assert_allclose(s["mean"], rows.mean(0), rtol=1e-6)
        sq = (rows**2).sum(1)
        assert s["mean_sq_norm"] == pytest.approx(sq.mean())
        assert s["mean_norm"] == pytest.approx(np.sqrt(sq).mean())
        assert s["scale"] == pytest.approx(np.sqrt(rows.shape[1] / sq.mean()))


def test_splits(store):
    st, _, _ = store
    assert st.split("eval") == range(36, 40)  # ceil(0.1 * 40) = 4
    assert st.split("train") == range(0, 36) and st.split("all") == range(0, 40)
    with pytest.raises(SaekitError, match="unknown split"):
        st.split("test")


def test_holdout_at_least_one(tmp_path):
    make_store(tmp_path / "s", n_seq=10, holdout=0.01)
    st = ActivationStore(tmp_path / "s")
    assert st.split("eval") == range(9, 10)


def test_iter_sequences_in_order(store):
    st, tokens, acts = store
    got = list(st.iter_sequences(["a"], split="train", batch_seqs=8))
    assert [g[0] for g in got] == [0, 8, 16, 24, 32]
    np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), tokens[:36])
    np.testing.assert_array_equal(np.concatenate([g[2]["a"] for g in got]), acts["a"][:36])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_dtypes(tmp_path, dtype):
    tokens, acts = make_store(tmp_path / "s", dtype=dtype)
    st = ActivationStore(tmp_path / "s")
    got = st.read_acts("a", 0, 40)
    want = acts["a"].astype(np.float32)
    tdt = torch.float16 if dtype == "float16" else torch.bfloat16
    np.testing.assert_array_equal(got, torch.from_numpy(want).to(tdt).float().numpy())
    import h5py

    with h5py.File(tmp_path / "s" / "shard-00000.h5") as f:
        assert f["acts/a"].attrs["dtype"] == dtype
        assert f["acts/a"].dtype == (np.uint16 if dtype == "bfloat16" else np.float16)


def test_to_from_stored_inverse():
    x = torch.randn(4, 5)
    for dt, tdt in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        np.testing.assert_array_equal(from_stored(to_stored(x, dt), dt), x.to(tdt).float().numpy())


def ids(batch):
    return batch["a"][:, 0].round().long().tolist()


def test_batches_deterministic_same_rows_and_counted_only(store):
    st, tokens, _ = store
    it1 = st.batches(["a", "b"], 16, seed=3, buffer_rows=64)
    it2 = st.batches(["a", "b"], 16, seed=3, buffer_rows=64)
    it3 = st.batches(["a", "b"], 16, seed=4, buffer_rows=64)
    b1 = [next(it1) for _ in range(30)]
    b2 = [next(it2) for _ in range(30)]
    b3 = [next(it3) for _ in range(30)]
    assert all(ids(x) == ids(y) for x, y in zip(b1, b2))
    assert any(ids(x) != ids(y) for x, y in zip(b1, b3))
    counted = set(np.flatnonzero(row_mask(tokens[:36]).reshape(-1)).tolist())
    for b in b1:
        assert b["a"].dtype == torch.float32 and b["a"].shape == (16, 6) and b["b"].shape == (16, 3)
        torch.testing.assert_close(b["b"], 2 * b["a"][:, :3] + 1)  # same rows across hooks
        assert set(ids(b)) <= counted  # train split only, no BOS, no padding


def test_buffer_bounded_and_epochs(store):
    st, tokens, _ = store
    buffer_rows = 40
    n_train_rows = int(row_mask(tokens[:36]).sum())
    assert n_train_rows > 4 * buffer_rows  # the store is much larger than the buffer
    it = st.batches("a", 8, seed=0, buffer_rows=buffer_rows)
    n_fills = len(it._fills(0))
    per_epoch0 = sum(int(it.unit_rows[f].sum()) // 8 for f in it._fills(0))
    seen = []
    for _ in range(per_epoch0):
        seen += ids(next(it))
    assert len(seen) == len(set(seen))  # no row twice within an epoch
    assert len(seen) >= n_train_rows - n_fills * 7  # at most batch_size-1 rows skipped per fill
    later = [ids(next(it)) for _ in range(3 * per_epoch0)]  # endless: keeps going past epoch 0
    assert len(later) == 3 * per_epoch0
    assert it.peak_rows <= buffer_rows
    assert it._buf["a"].shape[0] == buffer_rows


def test_start_batch_resumes_exactly(store):
    st, _, _ = store
    full = st.batches(["a", "b"], 8, seed=1, buffer_rows=40)
    ref = [next(full) for _ in range(70)]  # crosses fills and an epoch boundary
    for n in (0, 1, 9, 33, 61):
        resumed = st.batches(["a", "b"], 8, seed=1, buffer_rows=40, start_batch=n)
        for k in range(n, 70):
            got = next(resumed)
            torch.testing.assert_close(got["a"], ref[k]["a"], rtol=0, atol=0)
            torch.testing.assert_close(got["b"], ref[k]["b"], rtol=0, atol=0)


def test_ranks_disjoint(store):
    st, tokens, _ = store
    per_rank = []
    for rank in range(3):
        it = st.batches("a", 4, seed=0, buffer_rows=40, rank=rank, world_size=3)
        per_rank.append({i for _ in range(60) for i in ids(next(it))})
    assert not (per_rank[0] & per_rank[1]) and not (per_rank[0] & per_rank[2]) and not (per_rank[1] & per_rank[2])
    with pytest.raises(SaekitError, match="rank"):
        st.batches("a", 4, rank=3, world_size=3)


def test_batches_errors(store):
    st, _, _ = store
    with pytest.raises(SaekitError, match="buffer_rows"):
        st.batches("a", 64, buffer_rows=32)
    with pytest.raises(SaekitError, match="fewer than one batch"):
        st.batches("a", 10_000, buffer_rows=20_000)


def test_verify_names_damaged_shard(store, tmp_path):
    st, _, _ = store
    assert verify(st.path) == []
    shard = st.path / "shard-00002.h5"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(st.path)
    assert len(problems) == 1 and "shard-00002.h5" in problems[0]


def test_float16_overflow_names_hook(tmp_path):
    header = {"model": ModelInfo("m", "f", 2, 1, CTX, 5).to_dict(), "config": {}, "config_hash": "h"}
    w = StoreWriter(tmp_path / "s", header=header, hooks=[HookSpec("blocks.0.hook_x", 0, [2])], context_size=CTX, dtype="float16", shard_seqs=2)
    tokens = np.zeros((1, CTX), np.int32)
    w.write(tokens, {"blocks.0.hook_x": torch.ones(1, CTX, 2)})
    w.write(tokens, {"blocks.0.hook_x": torch.full((1, CTX, 2), 1e6)})
    with pytest.raises(SaekitError, match=r"blocks\.0\.hook_x overflow float16.*bfloat16"):
        w.close()
    assert [f.name for f in (tmp_path / "s").iterdir()] == [MANIFEST]  # no half-written shard left
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["shards"] == []


def test_disk_full_surfaces_as_oserror(tmp_path, monkeypatch):
    import saekit.store.writer as store_mod  # the module that opens shards

    header = {"model": ModelInfo("m", "f", 2, 1, CTX, 5).to_dict(), "config": {}, "config_hash": "h"}
    w = StoreWriter(tmp_path / "s", header=header, hooks=[HookSpec("h", 0, [2])], context_size=CTX, dtype="float32", shard_seqs=4)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.h5py, "File", full)
    w.write(np.zeros((1, CTX), np.int32), {"h": torch.ones(1, CTX, 2)})
    with pytest.raises(OSError) as e:
        w.close()
    assert e.value.errno == errno.ENOSPC and "shard-00000.h5.tmp" in e.value.filename


def test_check_existing(tmp_path):
    make_store(tmp_path / "s", seed=0)
    m = check_existing(tmp_path / "s", {"seed": 0}, "hash0")
    assert m is not None and len(m["shards"]) == 6
    with pytest.raises(SaekitError, match="different config.*differs in seed"):
        check_existing(tmp_path / "s", {"seed": 1}, "hash1")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(SaekitError, match="not an activation store"):
        check_existing(tmp_path / "other", {}, "h")
    assert check_existing(tmp_path / "new", {}, "h") is None


def test_resume_rebuilds_stats_and_cleans_leftovers(tmp_path):
    """A writer reopened on a partly written store continues its shards and its statistics."""
    tokens, acts = synthetic(20)
    header = {"model": ModelInfo("m", "f", 6, 1, CTX, 50).to_dict(), "config": {}, "config_hash": "h"}
    hooks = [HookSpec("a", 0, [6]), HookSpec("b", 0, [3])]

    def part(s, e):
        return tokens[s:e], {k: torch.from_numpy(v[s:e]) for k, v in acts.items()}

    w = StoreWriter(tmp_path / "s", header=header, hooks=hooks, context_size=CTX, dtype="float32", shard_seqs=6)
    w.write(*part(0, 8))  # one finished shard, a second one open
    w.abort()
    (tmp_path / "s" / "shard-00003.h5").write_bytes(b"renamed but never listed")
    m = check_existing(tmp_path / "s", {}, "h")
    w = StoreWriter(tmp_path / "s", header=header, hooks=hooks, context_size=CTX, dtype="float32", shard_seqs=6, resume=m)
    assert w.n_done == 6 and not (tmp_path / "s" / "shard-00003.h5").exists()
    w.write(*part(6, 20))
    w.close()
    make_store(tmp_path / "ref", n_seq=20, shard_seqs=6)
    a, b = ActivationStore(tmp_path / "s"), ActivationStore(tmp_path / "ref")
    np.testing.assert_array_equal(a.read_acts("a", 0, 20), b.read_acts("a", 0, 20))
    for h in ("a", "b"):
        np.testing.assert_allclose(a.stats(h)["mean"], b.stats(h)["mean"], rtol=1e-6)
        assert a.stats(h)["count"] == b.stats(h)["count"]
    np.testing.assert_array_equal(a.read_tokens(0, 20), b.read_tokens(0, 20))
