"""The store's fast loader: raw chunk reads equal h5py's, and worker threads, the reference read path,
the batch dtype and the CUDA staging change nothing about which rows a batch holds or their order.

Stores come from tests/test_store.py's `make_store` (hook "a" names each row's global id in
dimension 0; hook "b" is 2·a[:, :3] + 1).  CUDA tests skip without a device.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from test_store import make_store

import saekit.store.reader as reader
from saekit.errors import SaekitError
from saekit.store import ActivationStore
from saekit.store.chunks import chunk_map, read_h5py

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for h in x:
            assert x[h].dtype == y[h].dtype
            torch.testing.assert_close(x[h].cpu(), y[h].cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_raw_reads_equal_h5py(tmp_path, dtype):
    make_store(tmp_path / "s", dtype=dtype, shard_seqs=9)
    st = ActivationStore(tmp_path / "s")
    with h5py.File(st.path / "shard-00001.h5") as f:
        for name in ("tokens", "acts/a", "acts/b"):
            ds = f[name]
            assert chunk_map(ds) is not None  # the writer's layout is raw-readable
            for a, b in ((0, 9), (2, 7), (8, 9), (0, 1)):
                raw = np.full((b - a, *ds.shape[1:]), 7, ds.dtype)
                ref = np.zeros_like(raw)
                st._read_into(name, 9 + a, 9 + b, raw)  # shard 1 holds global sequences 9..17
                read_h5py(ds, a, b, ref)
                np.testing.assert_array_equal(raw, ref)


def test_workers_and_reference_path_give_the_same_batches(tmp_path, monkeypatch):
    make_store(tmp_path / "s", dtype="float16")
    st = ActivationStore(tmp_path / "s")
    kw = dict(seed=1, buffer_rows=40)
    ref = take(st.batches(["a", "b"], 8, **kw), 70)  # crosses fills and an epoch boundary
    assert_same(take(st.batches(["a", "b"], 8, workers=3, **kw), 70), ref)
    for n in (9, 61):  # resume is exact with workers too
        assert_same(take(st.batches(["a", "b"], 8, workers=2, start_batch=n, **kw), 70 - n), ref[n:])
    monkeypatch.setattr(reader, "chunk_map", lambda ds: None)  # every read through h5py
    assert_same(take(ActivationStore(tmp_path / "s").batches(["a", "b"], 8, workers=2, **kw), 70), ref)


def test_batches_hold_the_stored_values(tmp_path):
    tokens, acts = make_store(tmp_path / "s", dtype="bfloat16")
    st = ActivationStore(tmp_path / "s")
    stored = st.batches(["a", "b"], 16, seed=0, buffer_rows=64, dtype=None)
    f32 = st.batches(["a", "b"], 16, seed=0, buffer_rows=64)
    want_a = torch.from_numpy(acts["a"].reshape(-1, 6)).to(torch.bfloat16)
    want_b = torch.from_numpy(acts["b"].reshape(-1, 3)).to(torch.bfloat16)
    for _ in range(12):
        x, y = next(stored), next(f32)
        assert x["a"].dtype == torch.bfloat16 and y["a"].dtype == torch.float32
        torch.testing.assert_close(x["a"].float(), y["a"], rtol=0, atol=0)
        rows = [int(v) for v in y["a"][:, 0]]  # ids below 256 survive bfloat16 exactly
        rows = [r for r in rows if r < 256]
        assert rows
        i = torch.tensor([int(torch.nonzero(want_a[:, 0] == r)[0]) for r in rows])
        mask = y["a"][:, 0] < 256
        torch.testing.assert_close(x["a"][mask], want_a[i], rtol=0, atol=0)
        torch.testing.assert_close(x["b"][mask], want_b[i], rtol=0, atol=0)


def test_compressed_store_is_read_through_h5py(tmp_path):
    make_store(tmp_path / "s", dtype="float16")
    with ActivationStore(tmp_path / "s") as st:
        ref = take(st.batches(["a", "b"], 8, seed=2, buffer_rows=40), 30)
    for shard in sorted((tmp_path / "s").glob("shard-*.h5")):  # rewrite every dataset gzip-compressed
        with h5py.File(shard, "a") as f:
            for name in ("tokens", "acts/a", "acts/b"):
                data, attrs, chunks = f[name][...], dict(f[name].attrs), f[name].chunks
                del f[name]
                ds = f.create_dataset(name, data=data, chunks=chunks, compression="gzip", maxshape=(None, *data.shape[1:]))
                ds.attrs.update(attrs)
            assert chunk_map(f["acts/a"]) is None
    _rehash(tmp_path / "s")  # a store rewritten on purpose: its manifest records the new checksums
    assert_same(take(ActivationStore(tmp_path / "s").batches(["a", "b"], 8, seed=2, buffer_rows=40, workers=2), 30), ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_cast_serial_equals_to(threads):
    src = torch.randn(37, 3000).half()
    dst = torch.empty(37, 3000)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # one thread: one copy; more: blocks of SERIAL_ELEMENTS
    try:
        reader.cast_serial(src, dst)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(dst, src.float(), rtol=0, atol=0)


def test_float32_batches_are_the_stored_rows_cast(tmp_path):
    make_store(tmp_path / "s", dtype="float16")
    st = ActivationStore(tmp_path / "s")
    stored = take(st.batches(["a", "b"], 8, seed=3, buffer_rows=40, dtype=None), 20)
    cast = take(st.batches(["a", "b"], 8, seed=3, buffer_rows=40), 20)
    assert all(x.dtype == torch.float16 for b in stored for x in b.values())
    assert_same(cast, [{h: x.float() for h, x in b.items()} for b in stored])


def expected_batches(st, hooks, bs, n, seed, buffer_rows, rank=0, world_size=1):
    """The loader's documented order, computed the slow way: each fill's rows in unit order; batch k holds
    the rows perm[k·bs : (k+1)·bs] of the fill's permutation (rng(seed, rank, epoch, fill, 1)) in their order
    in the fill (`scatter.BATCH_ORDER` 2); whole batches only."""
    it = st.batches(hooks, bs, seed=seed, buffer_rows=buffer_rows, rank=rank, world_size=world_size)
    units, unit_rows = it.units, it.unit_rows
    it.close()
    out, epoch = [], 0
    while len(out) < n:
        for fi, fill in enumerate(it._fills(epoch)):
            rows = {h: [] for h in hooks}
            for u in fill:
                a, b = units[u]
                keep = st.row_mask(st.read_tokens(a, b)).reshape(-1)
                for h in hooks:
                    rows[h].append(st.read_acts(h, a, b).reshape(-1, st.hook_width(h))[keep])
            rows = {h: np.concatenate(v) for h, v in rows.items()}
            m = int(unit_rows[fill].sum())
            perm = np.random.default_rng([seed, rank, epoch, fi, 1]).permutation(m)
            for k in range(m // bs):
                out.append({h: torch.from_numpy(v[np.sort(perm[k * bs : (k + 1) * bs])]) for h, v in rows.items()})
        epoch += 1
    return out[:n]


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_follow_the_documented_order(tmp_path, workers):
    """Batches are the rows of each fill (units in the epoch's order) chosen by the fill's permutation, in fill
    order: any faster reader must keep this (or raise scatter.BATCH_ORDER), or runs and checkpoints would not
    resume the same."""
    make_store(tmp_path / "s", dtype="float32", shard_seqs=9)
    st = ActivationStore(tmp_path / "s")
    for rank, world in ((0, 1), (1, 2)):
        want = expected_batches(st, ["a", "b"], 8, 50, seed=6, buffer_rows=40, rank=rank, world_size=world)
        got = take(st.batches(["a", "b"], 8, seed=6, buffer_rows=40, rank=rank, world_size=world, workers=workers), 50)
        assert_same(got, want)


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_are_recycled_only_once_dropped(tmp_path, monkeypatch, workers):
    make_store(tmp_path / "s", dtype="float16")
    st = ActivationStore(tmp_path / "s")
    kw = dict(seed=4, buffer_rows=40, workers=workers)
    ref = take(st.batches(["a", "b"], 8, **kw), 40)  # all held: nothing can be recycled
    assert len({b["a"].data_ptr() for b in ref}) == len(ref)
    reused = []  # per array handed out: was it one of the recycler's idle arrays?
    get = reader.Recycler.get

    def counting_get(self, shape, dtype):
        before = {id(x) for x in self.arrays}
        arr = get(self, shape, dtype)
        reused.append(id(arr) in before)
        return arr

    monkeypatch.setattr(reader.Recycler, "get", counting_get)
    it = st.batches(["a", "b"], 8, **kw)
    kept = {}
    for i in range(40):
        b = next(it)
        assert_same([b], [ref[i]])
        if i == 16:
            phase1 = len(reused)
        if i < 16 or i % 3 == 0:
            kept[i] = b  # a batch the consumer holds on to must never be written again
        elif i % 3 == 1:
            kept[i] = {"view": b["a"][2:5], "numpy": b["b"].numpy()}  # views and numpy views hold it too
        del b
    for i, b in kept.items():
        if "view" not in b:
            assert_same([b], [ref[i]])
        else:
            torch.testing.assert_close(b["view"], ref[i]["a"][2:5], rtol=0, atol=0)
            np.testing.assert_array_equal(b["numpy"], ref[i]["b"].numpy())
    assert not any(reused[: 2 * 16 - 2 * workers])  # while every batch is kept, nothing is recycled
    assert any(reused[phase1:])  # dropped batches' memory comes back, also after 16 kept batches filled the pool


def test_store_changed_while_reading(tmp_path):
    make_store(tmp_path / "s")
    st = ActivationStore(tmp_path / "s")
    it = st.batches("a", 8, buffer_rows=40)
    st.close()  # HDF5 will not open a file for writing that this process holds open for reading
    with h5py.File(tmp_path / "s" / "shard-00000.h5", "a") as f:
        f["tokens"][:, 3] = -1  # padding where there were rows: the counts no longer match
    # Either check may see it first: the shard's checksum on first open, or the row counts while reading.
    with pytest.raises(SaekitError, match="changed while|checksum mismatch"):
        take(it, 40)


def _rehash(store):
    import json

    from saekit.store.format import sha256_file

    m = json.loads((store / "manifest.json").read_text())
    for entry in m["shards"]:
        entry["sha256"] = sha256_file(store / entry["file"])
    (store / "manifest.json").write_text(json.dumps(m))


def test_workers_errors(tmp_path):
    make_store(tmp_path / "s")
    with pytest.raises(SaekitError, match="workers"):
        ActivationStore(tmp_path / "s").batches("a", 8, buffer_rows=40, workers=0)


def test_close_stops_workers(tmp_path):
    import threading

    make_store(tmp_path / "s")
    before = set(threading.enumerate())
    it = ActivationStore(tmp_path / "s").batches("a", 8, buffer_rows=40, workers=2)
    take(it, 5)
    # ThreadPoolExecutor starts threads lazily, so how many are alive depends on timing: at least
    # one and at most 2 workers + 1 loading the next fill, all of them the reader's.
    started = set(threading.enumerate()) - before
    assert 1 <= len(started) <= 3
    assert all(t.name.startswith("saekit-reader") for t in started)
    it.close()
    assert not set(threading.enumerate()) - before


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, None])
def test_cuda_batches_equal_cpu(tmp_path, dtype):
    make_store(tmp_path / "s", dtype="float16")
    st = ActivationStore(tmp_path / "s")
    kw = dict(seed=1, buffer_rows=40, dtype=dtype)
    ref = take(st.batches(["a", "b"], 8, **kw), 50)
    assert st.batches(["a", "b"], 8, device="cuda", **kw).on_device  # the default: a small fill goes to the device
    for workers in (1, 3):  # 50 batches go round the pinned ring many times, and cross fills
        for on_device in (False, True):
            it = st.batches(["a", "b"], 8, device="cuda", workers=workers, gather_on_device=on_device, **kw)
            got = take(it, 50)
            assert it.on_device == on_device
            for x in got:
                assert all(v.device.type == "cuda" for v in x.values())
            assert_same(got, ref)


def test_device_fill_fits():
    assert reader.device_fill_fits(1 << 30, 8 << 30) and not reader.device_fill_fits((1 << 30) + 1, 8 << 30)
    assert not reader.device_fill_fits(26 * 4608 * 2 * (1 << 17), 141 << 30)  # 26 hooks at width 4,608 on an H200


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_gather_on_device_equals_the_host_path(tmp_path, store_dtype):
    """The CUDA path's device-side gather, run with device="cpu": same rows, same order, same dtype, exact resume."""
    make_store(tmp_path / "s", dtype=store_dtype)
    st = ActivationStore(tmp_path / "s")
    for dtype in (torch.float32, None):
        kw = dict(seed=5, buffer_rows=40, dtype=dtype)
        ref = take(st.batches(["a", "b"], 8, **kw), 60)  # crosses fills and an epoch
        for workers in (1, 2):
            it = st.batches(["a", "b"], 8, workers=workers, gather_on_device=True, **kw)
            assert it.on_device
            assert_same(take(it, 60), ref)
        for n in (7, 33):
            assert_same(take(st.batches(["a", "b"], 8, start_batch=n, gather_on_device=True, **kw), 60 - n), ref[n:])


@cuda
def test_cuda_batches_survive_a_busy_step(tmp_path):
    """Batches consumed by slow kernels on the default stream while later copies run: values stay right."""
    make_store(tmp_path / "s", dtype="float16")
    st = ActivationStore(tmp_path / "s")
    ref = take(st.batches("a", 8, seed=0, buffer_rows=40), 40)
    it = st.batches("a", 8, seed=0, buffer_rows=40, device="cuda", workers=2)
    big = torch.randn(2048, 2048, device="cuda")
    sums = []
    for _ in range(40):
        x = next(it)["a"]
        for _ in range(3):
            big = big @ big / 2048**0.5  # keep the stream busy while the next copies are queued
        sums.append(x.sum())
    torch.testing.assert_close(torch.stack(sums).cpu(), torch.stack([r["a"].sum() for r in ref]), rtol=1e-6, atol=1e-3)


def test_units_across_chunk_boundaries(tmp_path, monkeypatch):
    """Chunks of 3 sequences, units of 2: every other unit spans two chunks and is read whole (read_raw)."""
    import saekit.store.writer as writer

    monkeypatch.setattr(writer, "CHUNK_BYTES", 3 * 8 * 6 * 2)  # 3 sequences of ctx 8, width 6, float16
    make_store(tmp_path / "s", dtype="float16")
    with h5py.File(tmp_path / "s" / "shard-00000.h5") as f:
        assert f["acts/a"].chunks[0] == 3
    st = ActivationStore(tmp_path / "s")
    it = st.batches(["a", "b"], 8, seed=5, buffer_rows=24)  # units of (24 - 8) // 8 = 2 sequences
    assert any(a // 3 != (b - 1) // 3 for a, b in it.units)
    got = take(it, 40)
    monkeypatch.setattr(reader, "chunk_map", lambda ds: None)
    assert_same(take(ActivationStore(tmp_path / "s").batches(["a", "b"], 8, seed=5, buffer_rows=24), 40), got)


def test_fill_layout_puts_each_batch_in_order_in_one_slice():
    """`scatter.slots`: batch b's rows (perm[b·bs:(b+1)·bs]) land in rows [b·bs, (b+1)·bs), ascending by place in the fill;
    the left-over rows after the last batch."""
    from saekit.store import scatter

    for n, bs in ((50, 8), (64, 8), (7, 8), (1000, 1)):
        perm = np.random.default_rng(n).permutation(n)
        dest = scatter.slots(perm, bs)
        assert sorted(dest.tolist()) == list(range(n))
        placed = np.empty(n, np.int64)
        placed[dest] = np.arange(n)  # which fill row each buffer row holds
        for b in range(n // bs):
            assert placed[b * bs : (b + 1) * bs].tolist() == sorted(perm[b * bs : (b + 1) * bs].tolist())
        assert sorted(placed[n // bs * bs :].tolist()) == sorted(perm[n // bs * bs :].tolist())


@pytest.mark.parametrize("row_bytes,shift", [(512, 0), (512, 3), (12, 4), (6, 2), (5, 0)])
def test_copy_kept_equals_numpy_at_any_alignment(row_bytes, shift):
    """Whatever word the copy can use (8 bytes down to 1: row size, offsets not a multiple of 8), it copies the kept rows."""
    from saekit.store import scatter

    rng = np.random.default_rng(row_bytes + shift)
    n_seq, per_seq = 5, 4
    src = rng.integers(0, 256, shift + n_seq * per_seq * row_bytes + 7, dtype=np.uint8)
    starts = shift + np.arange(n_seq, dtype=np.int64)[::-1] * per_seq * row_bytes  # sequences in any order
    keep = rng.random(n_seq * per_seq) < 0.7
    k = int(keep.sum())
    dest = rng.permutation(k + 3)[:k].astype(np.int64)
    dst = np.zeros((k + 3, row_bytes), np.uint8)
    scatter.copy_kept(src, starts, keep, dst, dest)
    rows = [src[s + t * row_bytes : s + (t + 1) * row_bytes] for s in starts for t in range(per_seq)]
    want = np.stack(rows)[keep]
    np.testing.assert_array_equal(dst[dest], want)
    untouched = np.setdiff1d(np.arange(k + 3), dest)
    assert not dst[untouched].any()
