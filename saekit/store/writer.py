"""`StoreWriter`: sequences in, finished shards and an up-to-date manifest out.

Crash safety comes from two rules.  A shard is written under `shard-NNNNN.h5.tmp` and
renamed only when complete, and the manifest (rewritten atomically after every shard) is
the only list of finished shards.  Per-shard statistics live inside each shard so a
resumed harvest rebuilds the manifest's totals without rereading activations.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np
import torch

from saekit.errors import SaekitError
from saekit.models import HookSpec
from saekit.store.format import (
    CHUNK_BYTES,
    DTYPES,
    FORMAT,
    MANIFEST,
    PROGRESS_PREFIX,
    TMP_SUFFIX,
    VERSION,
    RunningStats,
    from_stored,
    gaps,
    read_shard_stats,
    row_mask,
    sha256_file,
    shard_index,
    shard_name,
    to_stored,
    write_json_atomic,
)
from saekit.tokens import PAD


def _reserve(path: Path, data_bytes: int) -> None:
    """Allocate a shard's disk space before HDF5 writes it, so a full disk fails here, cleanly, with ENOSPC.

    Once HDF5 holds unwritten chunks, a failed write surfaces only when a handle is freed
    (printed, not raised) and leaves the library in a state that crashes at exit.  The
    file's size is kept (FALLOC_FL_KEEP_SIZE), so HDF5 sees the empty file it created; it
    releases what it does not use when it closes.  Skipped where fallocate is missing.
    """
    size = int(data_bytes * 1.02) + (64 << 10)  # + chunk index, statistics and attributes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_WRONLY)
    try:
        if fallocate(fd, 1, 0, size) != 0:  # 1 = FALLOC_FL_KEEP_SIZE
            err = ctypes.get_errno()
            if err in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _silence(path: Path) -> None:
    """Point the descriptors HDF5 holds on a file being thrown away at /dev/null, so closing it cannot fail.

    After a failed write (disk full) HDF5 still holds dirty chunks and metadata; closing
    would write them again, fail, leave the file half-open, print a traceback for every
    handle freed later and crash the library at exit (asking HDF5 for its descriptor then
    crashes too, so it is found in /proc).  The temporary file is deleted right after.
    """
    target = str(path.resolve())
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return  # no /proc (not Linux): the close below may then print HDF5's complaints
    fds = []
    for fd in names:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                fds.append(int(fd))
        except OSError:
            continue  # closed meanwhile (listdir's own descriptor)
    for fd in fds:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)


class StoreWriter:
    """Append sequences to a store; a background thread converts, checks and writes them.

    `write(tokens, acts)` only enqueues (bounded queue, so memory stays flat), so writing
    shard k overlaps the forward passes for shard k+1.  With `background=False` (harvest on a
    CPU whose cores torch's threads all use) `write` does that work itself, and errors raise there.  Shard `i` always holds global
    sequences [i·shard_seqs, (i+1)·shard_seqs): resuming at a shard boundary regenerates
    exactly the same shards.  Errors raised in the thread (float16 overflow, disk full)
    surface in the caller at the next `write` or at `close`.

    Under a distributed harvest each rank has its own writer: `write(..., start=i)` names
    the global index, so a rank writes only the shards it owns (non-adjacent ones), and
    `progress_file` (`progress_name(rank)`) receives the list of its finished shards in
    place of manifest.json, which only rank 0 writes (`consolidate`).  `clean=False` there:
    leftovers are removed once, by rank 0, before any rank starts writing.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        header: dict,
        hooks: list[HookSpec],
        context_size: int,
        dtype: str,
        shard_seqs: int,
        resume: dict | None = None,
        queue_size: int = 2,
        progress_file: str = MANIFEST,
        clean: bool = True,
        background: bool = True,
    ):
        if dtype not in DTYPES:
            raise SaekitError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        self.path = Path(path)
        self.hooks = hooks
        self.ctx = context_size
        self.dtype = dtype
        self.shard_seqs = shard_seqs
        self.exclude_bos = header.get("rows", {}).get("exclude_bos", True)
        itemsize = 4 if dtype == "float32" else 2
        widest = max(h.width for h in hooks)
        self.chunk_seqs = max(1, min(shard_seqs, CHUNK_BYTES // (context_size * widest * itemsize)))
        self.manifest = {
            "format": FORMAT,
            "version": VERSION,
            **header,
            "hooks": {h.name: {"width": h.width, "shape": list(h.shape), "layer": h.layer} for h in hooks},
            "dtype": dtype,
            "context_size": context_size,
            "shard_seqs": shard_seqs,
            "stats": {},
            "shards": [],
            "complete": False,
        }
        self._by_shard: dict[int, dict[str, RunningStats]] = {}
        """Each finished shard's statistics by shard index: the totals sum them in index order, so a resumed or
        distributed run whose shards finished in another order writes the same floats as one run."""
        self._totals = self._sum_in_order()
        self.progress_file = progress_file
        if resume:
            self.manifest["shards"] = list(resume["shards"])
            self._rebuild_totals()
        if clean:
            self._clean_leftovers()
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_manifest()  # first write: an unwritable --out fails here, before any forward pass
        self._next = self.n_done  # caller side: where a write without `start` goes
        self._cur: h5py.File | None = None
        self._ds: dict = {}  # the open shard's datasets: "tokens" and each hook
        self._cur_tmp: Path | None = None
        self._cur_index = 0
        self._filled = 0
        self._shard_stats: dict[str, RunningStats] = {}
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        if background:  # otherwise each write converts and stores in the caller's thread
            self._thread = threading.Thread(target=self._run, name="saekit-store-writer", daemon=True)
            self._thread.start()

    # -- state
    @property
    def n_done(self) -> int:
        """Sequences in finished shards (where a resumed harvest starts)."""
        return sum(s["n_seq"] for s in self.manifest["shards"])

    def _sum_in_order(self) -> dict[str, RunningStats]:
        """Statistics over every finished shard, summed in shard order."""
        out = {h.name: RunningStats(h.width) for h in self.hooks}
        for i in sorted(self._by_shard):
            for name, st in self._by_shard[i].items():
                out[name].merge(st)
        return out

    def _add_shard_stats(self, index: int, stats: dict[str, RunningStats]) -> None:
        """Record a finished shard's statistics; the totals stay summed in shard order."""
        last = max(self._by_shard, default=-1)
        self._by_shard[index] = stats
        if index > last:  # the usual case: the next shard, added to the running totals
            for name, st in stats.items():
                self._totals[name].merge(st)
        else:  # a gap filled by a resumed or distributed run: sum again in order
            self._totals = self._sum_in_order()

    def _rebuild_totals(self) -> None:
        for s in self.manifest["shards"]:
            f = self.path / s["file"]
            if not f.is_file():
                raise SaekitError(f"{self.path}: finished shard {s['file']} is missing; re-harvest into a new --out")
            with h5py.File(f, "r") as h5:
                self._by_shard[shard_index(s["file"]) or 0] = read_shard_stats(h5, [h.name for h in self.hooks])
        self._totals = self._sum_in_order()

    def _clean_leftovers(self) -> None:
        """Remove temp files and shards a killed run renamed but never listed (they will be rewritten)."""
        if not self.path.is_dir():
            return
        listed = {s["file"] for s in self.manifest["shards"]}
        for f in self.path.iterdir():
            if f.name.endswith(TMP_SUFFIX) or (f.name.startswith("shard-") and f.name.endswith(".h5") and f.name not in listed):
                f.unlink()
            elif f.name.startswith(PROGRESS_PREFIX):  # a distributed run's lists: `resume` already holds their shards
                f.unlink()

    def _write_manifest(self) -> None:
        self.manifest["stats"] = {name: tot.summary() for name, tot in self._totals.items()}
        write_json_atomic(self.path / self.progress_file, self.manifest)

    # -- caller side
    def write(self, tokens: np.ndarray, acts: dict[str, torch.Tensor], start: int | None = None) -> None:
        """Queue sequences: tokens int32 [n, ctx], acts {hook: float [n, ctx, width]}.

        `start` is the global index of the first sequence (default: right after the last
        write).  A write that opens a shard must start at a shard boundary.
        """
        start = self._next if start is None else int(start)
        self._next = start + len(tokens)
        item = (np.asarray(tokens, np.int32), acts, start)
        if self._thread is None:
            self._raise_if_failed()
            self._handle(item)
            self._raise_if_failed()
            return
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Finish the last (possibly short) shard, mark the store (or this rank's part) complete."""
        self._stop("close")
        self._raise_if_failed()
        if self.progress_file == MANIFEST:
            problems = gaps(self.manifest["shards"], self.shard_seqs)
            if problems:
                raise SaekitError(f"{self.path}: {'; '.join(problems)}; rerun the same harvest command to fill them")
        self.manifest["complete"] = True
        self._write_manifest()

    def abort(self) -> None:
        """Stop without finishing the open shard (its temp file is deleted); finished shards stay."""
        self._stop("abort")

    def _stop(self, how: str) -> None:
        if self._thread is None:
            self._handle(how)
            return
        while self._thread.is_alive():
            try:
                self._queue.put(how, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- writer thread
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            self._handle(item)
            if isinstance(item, str):
                return

    def _handle(self, item) -> None:
        """One queued item: sequences to append, or "close" / "abort"; a failure is kept for the caller."""
        if isinstance(item, str):
            try:
                if item == "close" and self._error is None and self._cur is not None:
                    self._finish_shard()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._fail(e)
            self._discard_tmp()
            return
        if self._error is not None:
            return  # drain until told to stop
        try:
            self._append(*item)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self._error = e
        self._discard_tmp()

    def _discard_tmp(self) -> None:
        if self._cur is not None:
            if self._cur_tmp is not None:
                _silence(self._cur_tmp)
            self._ds = {}
            try:
                self._cur.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away
                pass
            self._cur = None
        if self._cur_tmp is not None and self._cur_tmp.exists():
            self._cur_tmp.unlink()
        self._cur_tmp = None

    def _open_shard(self, index: int) -> None:
        self._cur_index = index
        self._cur_tmp = self.path / (shard_name(index) + TMP_SUFFIX)
        try:
            f = h5py.File(self._cur_tmp, "w")
        except OSError as e:
            raise self._os_error(e) from e
        self._cur = f
        n, ctx, c = self.shard_seqs, self.ctx, self.chunk_seqs
        itemsize = 4 if self.dtype == "float32" else 2
        try:
            _reserve(self._cur_tmp, -(-n // c) * c * ctx * (4 + itemsize * sum(h.width for h in self.hooks)))  # whole chunks
        except OSError as e:
            raise self._os_error(e) from e
        f.attrs.update({"format": FORMAT, "index": index, "first_seq": index * self.shard_seqs, "chunk_seqs": c})
        # Handles kept for the shard's life: a temporary one would flush its chunks when freed, where a
        # failed write (disk full) is only printed, never raised.
        self._ds = {"tokens": f.create_dataset("tokens", shape=(n, ctx), maxshape=(None, ctx), dtype=np.int32, chunks=(c, ctx), track_times=False)}
        store_dt = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[self.dtype]
        for h in self.hooks:
            ds = f.create_dataset(f"acts/{h.name}", shape=(n, ctx, h.width), maxshape=(None, ctx, h.width), dtype=store_dt, chunks=(c, ctx, h.width), track_times=False)
            self._ds[h.name] = ds
            ds.attrs["dtype"] = self.dtype
            ds.attrs["shape"] = list(h.shape)
        self._filled = 0
        self._shard_stats = {h.name: RunningStats(h.width) for h in self.hooks}

    def _append(self, tokens: np.ndarray, acts: dict[str, torch.Tensor], start: int) -> None:
        pos = 0
        while pos < len(tokens):
            g = start + pos  # global index of the next sequence
            if self._cur is None:
                if g % self.shard_seqs:
                    raise RuntimeError(f"write at sequence {g} opens a shard but is not at a shard boundary ({self.shard_seqs})")
                self._open_shard(g // self.shard_seqs)
            elif g != self._cur_index * self.shard_seqs + self._filled:
                raise RuntimeError(f"write at sequence {g} skips ahead inside shard {self._cur_index}")
            take = min(len(tokens) - pos, self.shard_seqs - self._filled)
            self._write_rows(tokens[pos : pos + take], {k: v[pos : pos + take] for k, v in acts.items()})
            pos += take
            if self._filled == self.shard_seqs:
                self._finish_shard()

    def _write_rows(self, tokens: np.ndarray, acts: dict[str, torch.Tensor]) -> None:
        a, b = self._filled, self._filled + len(tokens)
        mask = row_mask(tokens, self.exclude_bos)
        stored = {}
        for h in self.hooks:
            x = acts[h.name]
            arr = to_stored(x, self.dtype)
            back = from_stored(arr, self.dtype)
            if not np.isfinite(back).all():
                first = self._cur_index * self.shard_seqs + a
                if torch.isfinite(x).all() and self.dtype == "float16":
                    raise SaekitError(
                        f"activations at {h.name} overflow float16 (|x| > 65504) in sequences {first}..{first + len(tokens) - 1}; "
                        f"harvest with --dtype bfloat16 (or float32) into a new --out"
                    )
                raise SaekitError(f"the model produced NaN/inf at {h.name} in sequences {first}..{first + len(tokens) - 1}; check the model weights")
            stored[h.name] = arr
            self._shard_stats[h.name].update(back[mask])
        try:
            self._ds["tokens"][a:b] = tokens
            for name, arr in stored.items():
                self._ds[name][a:b] = arr
        except OSError as e:
            raise self._os_error(e) from e
        self._filled = b

    def _finish_shard(self) -> None:
        f, tmp = self._cur, self._cur_tmp
        n = self._filled
        try:
            if n < self.shard_seqs:
                for ds in self._ds.values():
                    ds.resize(n, axis=0)
            f.attrs["n_seq"] = n
            for name, st in self._shard_stats.items():
                for k, v in st.arrays().items():
                    f.create_dataset(f"stats/{name}/{k}", data=v, track_times=False)
            tokens = self._ds["tokens"][:]
            self._ds = {}
            f.close()
            self._cur = None
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            final = self.path / shard_name(self._cur_index)
            os.replace(tmp, final)
            self._cur_tmp = None
        except OSError as e:
            raise self._os_error(e) from e
        self._add_shard_stats(self._cur_index, self._shard_stats)
        self.manifest["shards"] = [s for s in self.manifest["shards"] if s["file"] != final.name]
        self.manifest["shards"].append(
            {
                "file": final.name,
                "n_seq": n,
                "n_tokens": int((tokens != PAD).sum()),
                "n_rows": int(row_mask(tokens, self.exclude_bos).sum()),
                "chunk_seqs": self.chunk_seqs,
                "sha256": sha256_file(final),
            }
        )
        self.manifest["shards"].sort(key=lambda s: shard_index(s["file"]) or 0)  # a resumed or distributed run fills gaps
        self._write_manifest()

    def _os_error(self, e: OSError) -> OSError:
        """HDF5 often reports a failed write without errno; name the file and say ENOSPC when the disk is full."""
        target = str(self._cur_tmp or self.path)
        if e.errno is None:
            try:
                full = shutil.disk_usage(self.path).free < (64 << 20)
            except OSError:
                full = False
            if full:
                return OSError(errno.ENOSPC, "No space left on device", target)
        if e.filename is None and e.errno is not None:
            return OSError(e.errno, e.strerror or str(e), target)
        return e
