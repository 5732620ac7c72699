"""`ActivationStore` (sequences in order, splits, metadata), its shuffling loader `BatchStream`, and `saekit info`.

The loader (`ActivationStore.batches`) shuffles through a bounded buffer: the split is cut
into units (one HDF5 chunk, or less when the buffer is small), units are visited in a
random order per epoch and grouped into buffer fills of at most `buffer_rows` rows, and
each fill is shuffled and served as whole batches (the < batch_size rows left over in a
fill are skipped for that epoch; the next epoch's different grouping serves them).  Batch b
of a fill holds the rows perm[b·bs : (b+1)·bs] of its seeded permutation, in their order in
the fill (`scatter`: the fill writes each row to its batch's place, so serving is a copy).
Everything is a pure function of (seed, rank, epoch, fill), which is what makes
`start_batch` an exact and cheap resume: whole fills are skipped by counting rows from
the tokens alone.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import sys
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch

from saekit.errors import SaekitError, did_you_mean
from saekit.models import ModelInfo
from saekit.store import scatter
from saekit.store.chunks import ChunkMap, chunk_map, read_h5py, read_raw, seq_offsets
from saekit.store.format import MANIFEST, check_shard, from_stored, gaps, read_manifest, row_mask, sha256_file, shard_shape_problem
from saekit.store.staging import PinnedRing

STORED_NP = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
"""numpy dtype of each stored dtype (bfloat16 as its raw bits)."""


class ActivationStore:
    """Read a store: sequences in order, or endless shuffled row batches for training.

    Global sequence indices run over shards in order; the eval split is the last
    ⌈holdout·n_seq⌉ sequences (at least one when holdout > 0).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.model = ModelInfo.from_dict(m["model"])
        self.hooks: list[str] = list(m["hooks"])
        self.context_size: int = int(m["context_size"])
        self.dtype: str = m["dtype"]
        self.exclude_bos: bool = bool(m.get("rows", {}).get("exclude_bos", True))
        self.holdout: float = float(m.get("holdout", {}).get("fraction", 0.0))
        problems = gaps(m["shards"])
        if problems:
            raise SaekitError(f"store {self.path} is unfinished ({'; '.join(problems)}): a distributed harvest stopped early; "
                              "rerun the same harvest command to fill it")
        counts = [int(s["n_seq"]) for s in m["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._files: dict[int, h5py.File] = {}
        self._fds: dict[int, int] = {}
        self._mmaps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}  # shard -> its file mapped read-only, as bytes
        self._maps: dict[tuple[int, str], ChunkMap | None] = {}
        self._lock = threading.RLock()  # opening files and mapping chunks, from the loader's worker threads
        self._pid = os.getpid()

    # -- description
    @property
    def n_sequences(self) -> int:
        return int(self._starts[-1])

    @property
    def n_tokens(self) -> int:
        """Non-padding tokens stored (BOS included)."""
        return sum(int(s["n_tokens"]) for s in self.manifest["shards"])

    @property
    def n_rows(self) -> int:
        """Rows that count for training and statistics."""
        return sum(int(s["n_rows"]) for s in self.manifest["shards"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def _check_hook(self, hook: str) -> str:
        if hook not in self.manifest["hooks"]:
            raise SaekitError(f"store {self.path} has no hook {hook!r}{did_you_mean(hook, self.hooks)}; it has {', '.join(self.hooks)}")
        return hook

    def hook_width(self, hook: str) -> int:
        return int(self.manifest["hooks"][self._check_hook(hook)]["width"])

    def hook_shape(self, hook: str) -> list[int]:
        return list(self.manifest["hooks"][self._check_hook(hook)]["shape"])

    def stats(self, hook: str) -> dict:
        """count, mean (np.ndarray), mean_norm, mean_sq_norm, total_var, scale over all counted rows."""
        s = dict(self.manifest["stats"][self._check_hook(hook)])
        s["mean"] = np.asarray(s["mean"], dtype=np.float32)
        return s

    def split(self, name: str = "train") -> range:
        """Global sequence indices of "train", "eval" or "all"."""
        n = self.n_sequences
        n_eval = 0
        if self.holdout > 0 and n > 0:
            n_eval = min(n, max(1, math.ceil(self.holdout * n)))
        ranges = {"train": range(0, n - n_eval), "eval": range(n - n_eval, n), "all": range(0, n)}
        if name not in ranges:
            raise SaekitError(f"unknown split {name!r}; use train, eval or all")
        return ranges[name]

    # -- raw reads
    def _forked(self) -> None:
        if self._pid != os.getpid():  # h5py handles and file offsets must not cross a fork
            for fd in self._fds.values():
                os.close(fd)  # the child's copies; the parent's stay open
            self._files, self._fds, self._mmaps, self._pid = {}, {}, {}, os.getpid()

    def _file(self, i: int) -> h5py.File:
        self._forked()
        f = self._files.get(i)
        if f is not None:
            return f
        with self._lock:
            return self._open_file(i)

    def _open_file(self, i: int) -> h5py.File:
        f = self._files.get(i)
        if f is None:
            p = self.path / self.manifest["shards"][i]["file"]
            try:
                f = h5py.File(p, "r")
            except (FileNotFoundError, OSError) as e:
                raise SaekitError(f"cannot read shard {p} ({e}); run `saekit info {self.path} --verify`") from None
            self._files[i] = check_shard(self.path, self.manifest["shards"][i], self.manifest, f)  # once per shard per run
        return f

    def _fd(self, i: int) -> int:
        self._forked()
        fd = self._fds.get(i)
        if fd is not None:
            return fd
        with self._lock:
            return self._open_fd(i)

    def _open_fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is None:
            p = self.path / self.manifest["shards"][i]["file"]
            try:
                fd = self._fds[i] = os.open(p, os.O_RDONLY)
            except OSError as e:
                raise SaekitError(f"cannot read shard {p} ({e}); run `saekit info {self.path} --verify`") from None
        return fd

    def _chunk_map(self, i: int, name: str) -> ChunkMap | None:
        """Where dataset `name`'s chunks lie in shard i's file (None: read it through h5py); looked up once per run."""
        key = (i, name)
        if key not in self._maps:
            with self._lock:
                if key not in self._maps:
                    self._maps[key] = chunk_map(self._file(i)[name])
        return self._maps[key]

    def _read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Dataset `name` (tokens or acts/<hook>) of global sequences [start, stop) of one shard into `out`, as stored."""
        (i, a, b), = self._pieces(start, stop)
        cmap = self._chunk_map(i, name)
        if cmap is None:
            read_h5py(self._file(i)[name], a, b, out)
        else:
            read_raw(self._fd(i), cmap, a, b, out)

    def _mapped_seqs(self, name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(the shard's file as a read-only uint8 array, the byte offset of each sequence of [start, stop) in it), or
        None where the dataset cannot be read raw (filtered, not chunked by sequence, SAEKIT_READER=h5py)."""
        (i, a, b), = self._pieces(start, stop)
        cmap = self._chunk_map(i, name)
        if cmap is None:
            return None
        return self._mapped(i), seq_offsets(cmap, a, b)

    def _mapped(self, i: int) -> np.ndarray:
        """Shard i's file mapped into memory (read-only, once per run): rows are copied out of the page cache
        directly, with no read into a staging buffer first."""
        self._forked()
        got = self._mmaps.get(i)
        if got is None:
            with self._lock:
                got = self._mmaps.get(i)
                if got is None:
                    mm = mmap.mmap(self._fd(i), 0, access=mmap.ACCESS_READ)
                    got = self._mmaps[i] = (mm, np.frombuffer(mm, np.uint8))
        return got[1]

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard, local start, local stop) covering global sequences [start, stop)."""
        if not 0 <= start <= stop <= self.n_sequences:
            raise SaekitError(f"sequence range {start}:{stop} is outside the store's 0:{self.n_sequences}")
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            a = start - int(self._starts[i])
            b = min(stop, int(self._starts[i + 1])) - int(self._starts[i])
            if b > a:
                yield i, a, b
            start += b - a
            i += 1

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        parts = [self._file(i)["tokens"][a:b] for i, a, b in self._pieces(start, stop)]
        return np.concatenate(parts) if parts else np.zeros((0, self.context_size), np.int32)

    def read_acts(self, hook: str, start: int, stop: int) -> np.ndarray:
        """float32 [n, ctx, width] for global sequences [start, stop)."""
        self._check_hook(hook)
        parts = [from_stored(self._file(i)[f"acts/{hook}"][a:b], self.dtype) for i, a, b in self._pieces(start, stop)]
        if not parts:
            return np.zeros((0, self.context_size, self.hook_width(hook)), np.float32)
        return np.concatenate(parts)

    def row_mask(self, tokens: np.ndarray) -> np.ndarray:
        return row_mask(tokens, self.exclude_bos)

    def iter_sequences(self, hooks: list[str] | str | None = None, split: str = "all", batch_seqs: int = 64) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
        """(start index, tokens [n, ctx], {hook: float32 [n, ctx, width]}) in order over a split."""
        hooks = self._hook_list(hooks)
        r = self.split(split)
        for s in range(r.start, r.stop, batch_seqs):
            e = min(s + batch_seqs, r.stop)
            yield s, self.read_tokens(s, e), {h: self.read_acts(h, s, e) for h in hooks}

    def _hook_list(self, hooks) -> list[str]:
        if hooks is None:
            return list(self.hooks)
        hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        for h in hooks:
            self._check_hook(h)
        return hooks

    def batches(
        self,
        hooks: list[str] | str | None,
        batch_size: int,
        split: str = "train",
        seed: int = 0,
        buffer_rows: int = 1 << 17,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = torch.float32,
        gather_on_device: bool | None = None,
    ) -> "BatchStream":
        """Endless shuffled batches {hook: tensor [batch_size, width]} (same rows for every hook).

        `workers` threads read and copy ahead (None: 1 for CPU batches, which run beside the
        step on the same cores; up to 4 for a CUDA device; more than one also loads the next
        fill into a second buffer while this one is served); `device` (a CUDA device: staged
        through pinned memory, copied beside the step, cast there); `dtype` of the batches (None:
        as stored); `gather_on_device` (None: on a CUDA device whose memory holds 8 fills, `device_fill_fits`)
        copies each buffer fill once to `device` in the stored dtype and slices and casts every
        batch there.
        Rows and their order depend only on (seed, rank, world_size, batch_size, buffer_rows).
        """
        return BatchStream(self, self._hook_list(hooks), batch_size, split, seed, buffer_rows, start_batch, rank, world_size,
                           workers=workers, device=device, dtype=dtype, gather_on_device=gather_on_device)

    # -- lifetime
    def close(self) -> None:
        for f in self._files.values():
            f.close()
        mms = [mm for mm, _ in self._mmaps.values()]
        self._mmaps = {}  # drops this store's arrays over the mappings
        for mm in mms:
            with contextlib.suppress(BufferError):  # a view still held elsewhere: the mapping goes when it does
                mm.close()
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._files, self._fds, self._maps = {}, {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, hooks={self.hooks}, n_sequences={self.n_sequences})"


DEVICE_FILL_SHARE = 8
"""By default a fill is gathered on the GPU only where it takes at most 1/8 of the GPU's memory."""


def device_fill_fits(fill_bytes: int, device_bytes: int) -> bool:
    """Whether a buffer fill (every hook, stored dtype) is small enough to keep on the device by default:
    the dictionaries, their Adam state and the step's activations need the rest (a fill of 2**17 rows
    of 26 hooks at width 4,608 is 31 GB; such a run stages batches through the pinned ring)."""
    return fill_bytes * DEVICE_FILL_SHARE <= device_bytes


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


class Recycler:
    """Arrays handed out as batch tensors, and written again only once nothing holds them.

    `torch.from_numpy` keeps its array referenced until the last tensor (or view, or
    `.numpy()` of one) sharing that memory is freed, so an array whose reference count is back
    to the pool's own is free: a consumer that drops each batch gets the same few arrays back
    (no allocation, no page faults: at width 2,304 a fresh float32 batch of 4,096 rows cost
    more CPU time than casting into it), and one that keeps batches gets new ones.  The
    contract for users is the usual one: a batch is yours for as long as you hold it.
    Arrays are allocated by numpy, which asks Linux for transparent huge pages on arrays of
    4 MB and more (one page fault per 2 MB instead of per 4 KB).  Call from one thread.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.arrays: list[np.ndarray] = []
        self._oldest = 0
        probe = [np.empty(0)]
        self._idle_refs = sys.getrefcount(probe[0])  # the list's reference and getrefcount's argument

    def get(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An idle array of this shape and dtype (new if none is idle; kept for reuse while under `limit`)."""
        dtype = np.dtype(dtype)
        for i in range(len(self.arrays)):
            if sys.getrefcount(self.arrays[i]) <= self._idle_refs and self.arrays[i].shape == shape and self.arrays[i].dtype == dtype:
                return self.arrays[i]
        arr = np.empty(shape, dtype)
        if len(self.arrays) < self.limit:
            self.arrays.append(arr)
        else:  # all held: forget the oldest (its holder keeps it), so batches a consumer keeps do not end recycling
            self.arrays[self._oldest] = arr
            self._oldest = (self._oldest + 1) % self.limit
        return arr


SERIAL_ELEMENTS = 32768
"""torch runs an elementwise op of fewer elements on the calling thread alone (its grain size)."""


def cast_serial(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[:] = src (cast), in blocks small enough that torch runs each on this thread alone.

    A parallel cast on CPU costs more CPU time than it saves: the OpenMP team's threads spin
    after every region (float16 -> float32 at width 256: 0.25 GB of stored rows per CPU-second
    in one cast per batch, against about 2 GB with OMP_WAIT_POLICY=passive, on this 2-core
    machine), and the loader already runs beside the training step or in its own workers.
    """
    # one torch thread (torch.set_num_threads(1), which worker threads inherit): nothing to split
    rows = src.shape[0] if torch.get_num_threads() == 1 else max(1, SERIAL_ELEMENTS // max(1, src.shape[1]))
    for s in range(0, src.shape[0], rows):
        dst[s : s + rows].copy_(src[s : s + rows])


class BatchStream:
    """The iterator `ActivationStore.batches` returns; `peak_rows` records the most rows the buffer ever held.

    The buffer holds rows in the store's dtype, laid out by batch (`scatter`).  A fill copies each
    unit's counted rows from the shard file mapped into memory (the page cache, no read into a
    staging array) straight to their places (`scatter.copy_kept`); a filtered dataset, or
    SAEKIT_READER=h5py, is read whole into a per-thread staging array and copied from there.  A
    batch is then a contiguous slice, cast to float32 (or copied) into arrays recycled once the
    consumer drops the batch (`Recycler`).  `workers` threads copy a fill's units and serve up to
    `workers` batches ahead (every copy releases the GIL); with more than one worker a second buffer
    takes the next fill while this one is served.  With a CUDA `device` each fill is copied once to
    the device and batches are sliced and cast there (`gather_on_device`, `_device_batches`), or, with
    gather_on_device=False, each batch is copied into pinned memory and cast on the device
    (`store.staging`).  None of this changes which rows a batch holds or their order.
    """

    def __init__(self, store: ActivationStore, hooks, batch_size, split, seed, buffer_rows, start_batch, rank, world_size,
                 workers: int | None = 1, device: torch.device | str | None = None, dtype: torch.dtype | None = torch.float32,
                 gather_on_device: bool | None = None):
        if batch_size < 1:
            raise SaekitError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise SaekitError(f"rank {rank} is not in 0..{world_size - 1}")
        if start_batch < 0:
            raise SaekitError(f"start_batch must be >= 0, got {start_batch}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if workers is None:
            workers = 1 if device.type == "cpu" else max(1, min(4, _cpus() - 1))
        if workers < 1:
            raise SaekitError(f"workers must be at least 1, got {workers}")
        ctx = store.context_size
        if buffer_rows < batch_size + ctx:
            raise SaekitError(f"buffer_rows={buffer_rows} is too small: it must hold a batch plus one sequence ({batch_size + ctx} rows)")
        self.store, self.hooks, self.batch_size = store, hooks, batch_size
        self.seed, self.buffer_rows, self.rank, self.world_size = seed, buffer_rows, rank, world_size
        self.workers, self.dtype = workers, dtype
        self.device = device
        if gather_on_device is None:
            fill_bytes = buffer_rows * sum(store.hook_width(h) for h in hooks) * np.dtype(STORED_NP[store.dtype]).itemsize
            gather_on_device = device.type == "cuda" and device_fill_fits(fill_bytes, torch.cuda.get_device_properties(device).total_memory)
        self.on_device = bool(gather_on_device)
        """Whether each fill is copied to `device` once and batches are sliced there (`_device_batches`)."""
        self._dev: dict[str, torch.Tensor] = {}  # the fill on the device, stored dtype
        self._copied: dict[int, torch.cuda.Event] = {}  # id(host buffer) -> its copy to the device (CUDA)
        self._copy_stream = None  # CUDA: where fills are copied to the device
        self.batch_index = start_batch
        self.peak_rows = 0
        # A unit is at most one HDF5 chunk and small enough that any unit fits beside a batch.
        max_unit_seqs = max(1, (buffer_rows - batch_size) // ctx)
        r = store.split(split)
        units: list[tuple[int, int]] = []
        for i, s in enumerate(store.manifest["shards"]):
            lo, hi = int(store._starts[i]), int(store._starts[i + 1])
            step = min(int(s.get("chunk_seqs", s["n_seq"])), max_unit_seqs)
            for a in range(lo, hi, step):
                a2, b2 = max(a, r.start), min(a + step, hi, r.stop)
                if b2 > a2:
                    units.append((a2, b2))
        self.units = units[rank::world_size]
        if not self.units:
            raise SaekitError(f"split {split!r} of {store.path} has too few sequences for rank {rank} of {world_size}")
        # Rows per unit from the tokens alone: lets start_batch skip whole fills without reading activations.
        self.unit_rows = np.array([int(store.row_mask(store.read_tokens(a, b)).sum()) for a, b in self.units], np.int64)
        if self.unit_rows.sum() < batch_size:
            raise SaekitError(f"split {split!r} has {int(self.unit_rows.sum())} rows for this rank, fewer than one batch of {batch_size}")
        self._np_dtype = STORED_NP[store.dtype]
        self._widths = {h: store.hook_width(h) for h in hooks}
        self._max_unit = max(b - a for a, b in self.units)
        self._local = threading.local()  # per-thread staging arrays
        self._sources: dict[tuple[int, str], tuple[np.ndarray, np.ndarray] | None] = {}  # `_source`
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="saekit-reader") if workers > 1 else None
        # Loads the next fill in the background (workers > 1).
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="saekit-reader-fill") if workers > 1 else None
        self._ring = None  # CUDA pinned staging, made at the first batch
        self._outputs = Recycler(2 * workers + 4)  # CPU batches: those gathering ahead, a prefetcher's few, the one in use
        self._buf: dict[str, np.ndarray] | None = None
        self._gen = self._generate(start_batch)

    def _fills(self, epoch: int) -> list[list[int]]:
        """This epoch's unit order (seeded by seed, rank, epoch), grouped into fills of ≤ buffer_rows rows."""
        order = np.random.default_rng([self.seed, self.rank, epoch]).permutation(len(self.units))
        fills, cur, rows = [], [], 0
        for u in order:
            n = int(self.unit_rows[u])
            if cur and rows + n > self.buffer_rows:
                fills.append(cur)
                cur, rows = [], 0
            cur.append(int(u))
            rows += n
        if cur:
            fills.append(cur)
        return fills

    # -- filling the buffer
    def _staging(self, name: str) -> np.ndarray:
        """This thread's array for a unit's `name` ("tokens", or a hook read whole), made at first use."""
        st = getattr(self._local, "arrays", None)
        if st is None:
            st = self._local.arrays = {}
        if name not in st:
            n, ctx = self._max_unit, self.store.context_size
            st[name] = np.empty((n, ctx), np.int32) if name == "tokens" else np.empty((n, ctx, self._widths[name]), self._np_dtype)
        return st[name]

    def _load_unit(self, buf: dict[str, np.ndarray], u: int, dest: np.ndarray) -> None:
        """Unit u's counted rows, in their stored order, to rows `dest` of `buf` (`scatter.slots`)."""
        a, b = self.units[u]
        n = b - a
        tokens = self._tokens(u)
        keep = self.store.row_mask(tokens).reshape(-1)
        k = int(self.unit_rows[u])
        if int(keep.sum()) != k:
            raise SaekitError(f"store {self.store.path} changed while it was being read (sequences {a}:{b} now have "
                              f"{int(keep.sum())} rows, {k} before); restart training")
        for h in self._widths:
            out = buf[h].reshape(len(buf[h]), -1).view(np.uint8)  # [rows, row bytes]
            src = self._source(u, f"acts/{h}")
            if src is None:  # filtered, or the h5py reader: read whole into staging, copy the rows from there
                raw = self._staging(h)[:n]
                self.store._read_into(f"acts/{h}", a, b, raw)
                src = raw.reshape(-1).view(np.uint8), np.arange(n, dtype=np.int64) * raw[0].nbytes
            scatter.copy_kept(src[0], src[1], keep, out, dest)

    def _source(self, u: int, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """`ActivationStore._mapped_seqs` of unit u's dataset `name`, looked up once per run (a fill asks for every unit)."""
        key = (u, name)
        if key not in self._sources:
            a, b = self.units[u]
            self._sources[key] = self.store._mapped_seqs(name, a, b)  # two threads may both look it up: same answer
        return self._sources[key]

    def _tokens(self, u: int) -> np.ndarray:
        """Unit u's tokens [n, ctx]: a view of the mapped file where they lie in one run of bytes."""
        a, b = self.units[u]
        ctx = self.store.context_size
        src = self._source(u, "tokens")
        if src is not None:
            mem, starts = src
            if starts[-1] - starts[0] == (b - a - 1) * ctx * 4:
                return mem[starts[0] : starts[0] + (b - a) * ctx * 4].view(np.int32).reshape(b - a, ctx)
        tokens = self._staging("tokens")[: b - a]
        self.store._read_into("tokens", a, b, tokens)
        return tokens

    def _new_buffer(self) -> dict[str, np.ndarray]:
        if self.on_device and self.device.type == "cuda":  # pinned: the fill's copy to the device is one DMA, beside the step
            t = {np.dtype(np.float16): torch.float16, np.dtype(np.uint16): torch.int16, np.dtype(np.float32): torch.float32}[np.dtype(self._np_dtype)]
            with torch.cuda.device(self.device):
                return {h: torch.empty((self.buffer_rows, w), dtype=t, pin_memory=True).numpy().view(self._np_dtype)
                        for h, w in self._widths.items()}
        return {h: np.empty((self.buffer_rows, w), self._np_dtype) for h, w in self._widths.items()}

    def _load(self, epoch: int, fi: int, fill: list[int], buf: dict[str, np.ndarray], pool: ThreadPoolExecutor | None) -> int:
        """Fill `fi` of `epoch` into `buf`, laid out by its permutation: batch b is rows [b·bs, (b+1)·bs)."""
        done = self._copied.pop(id(buf), None)
        if done is not None:  # the device may still be copying this buffer's last fill
            done.synchronize()
        starts = np.concatenate([[0], np.cumsum(self.unit_rows[fill])]).astype(np.int64)
        n = int(starts[-1])
        perm = np.random.default_rng([self.seed, self.rank, epoch, fi, 1]).permutation(n)
        dest = scatter.slots(perm, self.batch_size)
        jobs = [(u, dest[p:q]) for u, p, q in zip(fill, starts[:-1], starts[1:])]
        if pool is None:
            for job in jobs:
                self._load_unit(buf, *job)
        else:
            list(pool.map(lambda job: self._load_unit(buf, *job), jobs))  # list(): wait, and raise a worker's error here
        self.peak_rows = max(self.peak_rows, n)
        return n

    # -- serving batches
    def _as_torch(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if arr.dtype == np.uint16 else t

    def _same_dtype(self) -> bool:
        return self.dtype is None or self._as_torch(np.empty(0, self._np_dtype)).dtype == self.dtype

    def _cpu_outputs(self, n: int) -> dict[str, torch.Tensor]:
        """A batch's tensors, from arrays recycled once the consumer has dropped every tensor using them.

        On the consumer's thread: glibc gives each thread its own arena, and memory freed back
        into a worker's small arena is returned to the kernel and faulted in again."""
        np_dtype = self._np_dtype if self._same_dtype() else _NUMPY.get(self.dtype)
        if np_dtype is None:  # an output dtype numpy has not (bfloat16 from a float16 store)
            return {h: torch.empty((n, w), dtype=self.dtype) for h, w in self._widths.items()}
        return {h: self._as_torch(self._outputs.get((n, w), np_dtype)) for h, w in self._widths.items()}

    def _copy_cpu(self, rows: slice, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One batch on the CPU into `out`: the buffer's contiguous `rows`, in `dtype` (None: the stored dtype)."""
        for h, x in out.items():
            cast_serial(self._as_torch(self._buf[h][rows]), x)
        return out

    def _copy_pinned(self, rows: slice, slot: int) -> int:
        """The buffer's `rows` into pinned ring slot `slot` (stored dtype); returns the slot."""
        for h, arr in self._ring.host_arrays(slot).items():
            np.copyto(arr[: rows.stop - rows.start], self._buf[h][rows])
        return slot

    def _batches(self, batches: Iterator[slice]) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one fill (slices of the buffer), in order, with up to `workers` copied ahead."""
        cuda = self.device.type == "cuda"
        if cuda and self._ring is None:
            # slots: `workers` copies in flight, the batch being copied, one spare
            self._ring = PinnedRing({h: (self.batch_size, w) for h, w in self._widths.items()}, self._np_dtype,
                                    self.workers + 2, self.device)
        count = 0

        def job(rows):
            """(work for a thread, what `finish` takes once it is done)."""
            nonlocal count
            if not cuda:
                box = [self._cpu_outputs(rows.stop - rows.start)]

                def copy():  # pop: a finished job keeps no reference to the batch, so `Recycler` sees it dropped
                    self._copy_cpu(rows, box.pop())
                return copy, box[0]
            slot = count % len(self._ring)  # only the consumer's thread submits, so slots go round in batch order
            count += 1
            return (lambda: self._copy_pinned(rows, slot)), slot

        def finish(result):
            if cuda:
                return self._ring.to_device(result, self.dtype)
            if self.device.type != "cpu":
                return {h: x.to(self.device) for h, x in result.items()}
            return result

        if self._pool is None:
            for rows in batches:
                work, result = job(rows)
                work()
                del work
                yield finish(result)
                del result
            return
        ahead: deque = deque()
        for rows in batches:
            work, result = job(rows)
            ahead.append((self._pool.submit(work), result))
            del work, result
            if len(ahead) >= self.workers:
                done, result = ahead.popleft()
                done.result()  # raises a worker's error here
                yield finish(result)
                del result
        while ahead:
            done, result = ahead.popleft()
            done.result()
            yield finish(result)
            del result

    def _plan(self, skip: int) -> Iterator[tuple[int, int, list[int], int, int]]:
        """(epoch, fill index, units, first batch, batches) of every fill that serves a batch, from batch `skip` on."""
        bs = self.batch_size
        epoch = 0
        while True:
            for fi, fill in enumerate(self._fills(epoch)):
                n_batches = int(self.unit_rows[fill].sum()) // bs
                if skip >= n_batches:
                    skip -= n_batches
                    continue
                yield epoch, fi, fill, skip, n_batches
                skip = 0
            epoch += 1

    def _serve(self, first: int, n_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches first .. n_batches - 1 of the fill in the buffer."""
        bs = self.batch_size
        if self.on_device:
            batches = self._device_batches(first * bs, n_batches * bs)
        else:
            batches = self._batches(slice(b * bs, (b + 1) * bs) for b in range(first, n_batches))
        for batch in batches:
            self.batch_index += 1
            yield batch

    def _device_batches(self, start: int, stop: int) -> Iterator[dict[str, torch.Tensor]]:
        """The buffer's rows [start, stop) (this fill's batches still to serve) copied once to the device in the stored
        dtype (half float32's bytes), then each batch sliced and cast there: the host does one copy per row."""
        cuda = self.device.type == "cuda"
        n = stop - start
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():  # a worker thread's current device is cuda:0
            # CUDA: the copy runs on a side stream after the work queued so far (the last fill's batches read the
            # device buffer), so it overlaps the steps queued after it; this fill's batches wait for it.
            consumer = torch.cuda.current_stream() if cuda else None
            if cuda:
                if self._copy_stream is None:
                    self._copy_stream = torch.cuda.Stream()
                self._copy_stream.wait_stream(consumer)
            for h, arr in self._buf.items():
                if h not in self._dev:  # allocated on the consumer's stream, which reads it
                    self._dev[h] = torch.empty((self.buffer_rows, arr.shape[1]), dtype=self._as_torch(arr[:0]).dtype, device=self.device)
            with torch.cuda.stream(self._copy_stream) if cuda else contextlib.nullcontext():
                for h, arr in self._buf.items():
                    self._dev[h][:n].copy_(self._as_torch(arr[start:stop]), non_blocking=True)
                if cuda:
                    ev = torch.cuda.Event()
                    ev.record()
                    self._copied[id(self._buf)] = ev  # `_load` waits for it before writing this host buffer again
            if cuda:
                consumer.wait_stream(self._copy_stream)
        bs = self.batch_size
        for b in range(n // bs):
            # copy=True: a batch is the consumer's for as long as it holds it; the next fill overwrites the device buffer
            yield {h: x[b * bs : (b + 1) * bs].to(self.dtype or x.dtype, copy=True) for h, x in self._dev.items()}
    def _generate(self, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        plan = self._plan(skip)
        if self._pool is None:  # one buffer, filled when the last fill's batches are out
            self._buf = self._new_buffer()
            for epoch, fi, fill, first, n_batches in plan:
                self._load(epoch, fi, fill, self._buf, None)
                yield from self._serve(first, n_batches)
            return
        # Workers: two buffers; the next fill loads (on `loader`'s threads) while this one is served, so a
        # GPU is not left waiting for a whole fill at each boundary.
        bufs = [self._new_buffer(), self._new_buffer()]
        cur = next(plan)
        pending = Future()
        pending.set_result(self._load(*cur[:3], bufs[0], self._pool))  # the first fill: every worker reads
        i = 0
        while True:
            pending.result()
            nxt = next(plan)
            # One thread of its own: units handed to the pool would queue ahead of this fill's copies.
            pending = self._loader.submit(self._load, *nxt[:3], bufs[1 - i], None)
            self._buf = bufs[i]
            yield from self._serve(*cur[3:])
            cur, i = nxt, 1 - i

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self._gen)

    def close(self) -> None:
        """Stop the worker threads (also done when the stream is dropped)."""
        self._gen.close()
        for pool in (self._loader, self._pool):  # the loader first: it feeds the pool
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._loader = None

    def __del__(self):
        for name in ("_loader", "_pool"):
            pool = getattr(self, name, None)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- inspection


def summary(path: str | Path) -> dict:
    """What `saekit info` prints: model, hooks, sizes, dtype, holdout, completeness."""
    store = ActivationStore(path)
    m = store.manifest
    size = sum((store.path / s["file"]).stat().st_size for s in m["shards"] if (store.path / s["file"]).exists())
    return {
        "path": str(store.path),
        "model": m["model"],
        "hooks": {h: {"width": v["width"], "shape": v["shape"], "layer": v["layer"]} for h, v in m["hooks"].items()},
        "dtype": store.dtype,
        "context_size": store.context_size,
        "n_sequences": store.n_sequences,
        "n_tokens": store.n_tokens,
        "n_rows": store.n_rows,
        "n_shards": len(m["shards"]),
        "bytes": size + (store.path / MANIFEST).stat().st_size,
        "holdout": store.holdout,
        "eval_sequences": len(store.split("eval")),
        "text": m.get("text", {}),
        "complete": store.complete,
    }


def verify(path: str | Path) -> list[str]:
    """Recompute every shard's sha256; one line per damaged or missing shard (empty when all are sound)."""
    m = read_manifest(path)
    problems = []
    for s in m["shards"]:
        f = Path(path) / s["file"]
        if not f.is_file():
            problems.append(f"{s['file']}: missing")
        elif sha256_file(f) != s["sha256"]:
            problems.append(f"{s['file']}: checksum mismatch (damaged)")
        else:
            try:
                with h5py.File(f, "r") as h5:
                    why = shard_shape_problem(s, m, h5)
            except OSError as e:
                why = f"not a readable HDF5 file ({e})"
            if why:
                problems.append(f"{s['file']}: {why}")
    return problems
