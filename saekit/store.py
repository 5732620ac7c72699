"""The activation store (format `saekit-activations` v1): writer, reader and shuffling loader.

A store is a directory (docs/architecture.md pins the layout):

    manifest.json       what was harvested, how, per-hook statistics, the finished shards
    shard-00000.h5      tokens int32 [n_seq, ctx] (-1 = padding), acts/<hook> [n_seq, ctx, width],
    shard-00001.h5      stats/<hook>/{count,sum,sumsq,norm_sum,sq_norm_sum} (float64, counted rows)
    ...

Crash safety comes from two rules.  A shard is written under `shard-NNNNN.h5.tmp` and
renamed only when complete, and the manifest (rewritten atomically after every shard) is
the only list of finished shards: a file the manifest does not name does not exist as far
as readers and resumes are concerned.  Per-shard statistics live inside each shard so a
resumed harvest rebuilds the manifest's totals without rereading activations.

Rows: one token's activation vector.  Padding rows never count; the BOS position is
excluded by default (`rows.exclude_bos`) because its activations are huge outliers in
most models and carry no information about text.

The loader (`ActivationStore.batches`) shuffles through a bounded buffer: the split is cut
into units (one HDF5 chunk, or less when the buffer is small), units are visited in a
random order per epoch and grouped into buffer fills of at most `buffer_rows` rows, and
each fill is shuffled and served as whole batches (the < batch_size rows left over in a
fill are skipped for that epoch; the next epoch's different grouping serves them).
Everything is a pure function of (seed, rank, epoch, fill), which is what makes
`start_batch` an exact and cheap resume: whole fills are skipped by counting rows from
the tokens alone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import queue
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from saekit.errors import SaekitError, did_you_mean
from saekit.models import HookSpec, ModelInfo
from saekit.text import PAD

FORMAT = "saekit-activations"
VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")
MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"
CHUNK_BYTES = 1 << 20
"""Target size of one HDF5 chunk of activations: one contiguous read for the shuffling loader."""
STAT_KEYS = ("count", "sum", "sumsq", "norm_sum", "sq_norm_sum")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def shard_index(name: str) -> int | None:
    """The global index in a shard's file name (shard i holds sequences [i·shard_seqs, ...)); None if not a shard name."""
    if name.startswith("shard-") and name.endswith(".h5") and name[6:-3].isdigit():
        return int(name[6:-3])
    return None


PROGRESS_PREFIX = "progress-rank-"


def progress_name(rank: int) -> str:
    """The file where rank `rank` of a distributed harvest lists the shards it finished (folded into the manifest by rank 0)."""
    return f"{PROGRESS_PREFIX}{rank:05d}.json"


def gaps(shards: list[dict], shard_seqs: int | None = None) -> list[str]:
    """Why a list of finished shards is not one contiguous run of sequences (empty when it is).

    Shard i must sit at position i, and every shard but the last must be full: then global
    sequence indices are the cumulative sums the reader uses.
    """
    problems = []
    for pos, s in enumerate(shards):
        i = shard_index(s["file"])
        if i is not None and i != pos:
            missing = sorted(set(range(i)) - {shard_index(t["file"]) for t in shards})
            problems.append(f"shard(s) {', '.join(map(str, missing[:5]))} missing")
            break
        if shard_seqs and pos < len(shards) - 1 and int(s["n_seq"]) != shard_seqs:
            problems.append(f"{s['file']} holds {s['n_seq']} sequences but is not the last shard")
            break
    return problems


# --------------------------------------------------------------------------- pure helpers


def to_stored(x: torch.Tensor, dtype: str) -> np.ndarray:
    """float activations → the numpy array written to disk (bfloat16 as its raw uint16 bits, numpy has no bfloat16)."""
    if dtype == "float32":
        return x.to(torch.float32).cpu().numpy()
    if dtype == "float16":
        return x.to(torch.float16).cpu().numpy()
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    raise SaekitError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def from_stored(arr: np.ndarray, dtype: str) -> np.ndarray:
    """The inverse of `to_stored`, as float32."""
    if dtype == "bfloat16":
        bits = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16))
        return bits.view(torch.bfloat16).float().numpy()
    return arr.astype(np.float32, copy=False)


def row_mask(tokens: np.ndarray, exclude_bos: bool = True) -> np.ndarray:
    """bool [n, ctx]: the positions that count as rows (not padding; not position 0 when BOS is excluded)."""
    mask = tokens != PAD
    if exclude_bos:
        mask = mask.copy()
        mask[:, 0] = False
    return mask


class RunningStats:
    """Exact float64 sums over rows, mergeable across batches and shards."""

    def __init__(self, width: int):
        self.count = 0
        self.sum = np.zeros(width, np.float64)
        self.sumsq = np.zeros(width, np.float64)
        self.norm_sum = 0.0
        self.sq_norm_sum = 0.0

    def update(self, rows: np.ndarray) -> None:
        """rows: (n_rows, width) float."""
        x = torch.from_numpy(np.asarray(rows)).double()
        sq = x * x
        row_sq = sq.sum(1)
        self.count += x.shape[0]
        self.sum += x.sum(0).numpy()
        self.sumsq += sq.sum(0).numpy()
        self.norm_sum += row_sq.sqrt().sum().item()
        self.sq_norm_sum += row_sq.sum().item()

    def merge(self, other: "RunningStats") -> None:
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.norm_sum += other.norm_sum
        self.sq_norm_sum += other.sq_norm_sum

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(getattr(self, k), dtype=np.float64) for k in STAT_KEYS}

    @classmethod
    def from_arrays(cls, d) -> "RunningStats":
        s = cls(len(d["sum"]))
        s.count = int(np.asarray(d["count"]))
        s.sum = np.asarray(d["sum"], np.float64).copy()
        s.sumsq = np.asarray(d["sumsq"], np.float64).copy()
        s.norm_sum = float(np.asarray(d["norm_sum"]))
        s.sq_norm_sum = float(np.asarray(d["sq_norm_sum"]))
        return s

    def summary(self) -> dict:
        """The manifest's per-hook entry. `scale` makes E‖scale·x‖² = width (architecture.md)."""
        n = max(self.count, 1)
        mean = self.sum / n
        mean_sq_norm = self.sq_norm_sum / n
        width = len(self.sum)
        return {
            "count": self.count,
            "mean": mean.tolist(),
            "mean_norm": self.norm_sum / n,
            "mean_sq_norm": mean_sq_norm,
            # Σ_d Var(x_d): the denominator of FVU for a predictor that outputs the mean.
            "total_var": float(max(mean_sq_norm - float(mean @ mean), 0.0)),
            "scale": math.sqrt(width / mean_sq_norm) if mean_sq_norm > 0 else 1.0,
        }


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file, fsync, rename over `path`: readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict:
    """The manifest of store `path`, refusing anything that is not a saekit store."""
    p = Path(path)
    mp = p / MANIFEST
    if not mp.is_file():
        if not p.exists():
            raise SaekitError(f"activation store {p} does not exist; create it with `saekit harvest --out {p}`")
        raise SaekitError(f"{p} is not an activation store (no {MANIFEST}); point at a `saekit harvest` output folder")
    try:
        manifest = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaekitError(f"{mp} is damaged ({e}); re-harvest into a new --out") from None
    if manifest.get("format") != FORMAT:
        raise SaekitError(f"{mp} is not a {FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("version", 0) > VERSION:
        raise SaekitError(f"{p} is store version {manifest['version']}; this saekit reads up to {VERSION}: upgrade saekit")
    return manifest


def _config_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def check_existing(path: str | Path, config: dict, config_hash: str) -> dict | None:
    """Decide what an existing `path` means for a harvest with this config, touching nothing.

    Returns the manifest to resume from (same config, at least one finished shard), or None
    to start fresh (no such directory, an empty one, or a store with no finished shard).
    Refuses a different config or a folder that is not a store.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SaekitError(f"--out {p} is a file; choose a directory")
    if not (p / MANIFEST).is_file():
        if p.is_dir() and any(not f.name.endswith(TMP_SUFFIX) for f in p.iterdir()):
            raise SaekitError(f"--out {p} exists and is not an activation store; choose a new or empty directory")
        return None
    manifest = read_manifest(p)
    manifest["shards"] = finished_shards(p, manifest)
    if not manifest.get("shards"):
        return None  # nothing finished: nothing to lose by starting over
    if manifest.get("config_hash") != config_hash:
        diff = _config_diff(manifest.get("config", {}), config)
        what = f"differs in {', '.join(diff)}" if diff else "differs (model or data files changed)"
        raise SaekitError(
            f"{p} holds a harvest with a different config ({what}); rerun with the same options to resume, "
            f"or choose another --out"
        )
    return manifest


def _progress_files(path: Path) -> list[Path]:
    return sorted(f for f in path.glob(PROGRESS_PREFIX + "*.json")) if path.is_dir() else []


def finished_shards(path: str | Path, manifest: dict) -> list[dict]:
    """The manifest's shards plus those the ranks of a distributed harvest listed in their progress files.

    Sorted by global index, one entry per file.  A shard a rank listed is as final as one
    in the manifest: ranks list a shard only after its file is fsynced and renamed.
    """
    entries = {s["file"]: s for s in manifest.get("shards", [])}
    for f in _progress_files(Path(path)):
        try:
            part = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SaekitError(f"{f} is damaged ({e}); delete it (its rank's shards will be harvested again) and rerun") from None
        if part.get("config_hash") != manifest.get("config_hash"):
            raise SaekitError(f"{f} belongs to a harvest with another config than {path}/{MANIFEST}; delete it and rerun")
        for s in part.get("shards", []):
            entries.setdefault(s["file"], s)
    return sorted(entries.values(), key=lambda s: (shard_index(s["file"]) is None, shard_index(s["file"]) or 0, s["file"]))


def consolidate(path: str | Path, *, complete: bool) -> dict:
    """Fold every rank's progress file into manifest.json (statistics rebuilt from the shards), then delete them.

    Rank 0 calls this after the last barrier of a distributed harvest.  With `complete`,
    the shards must form one contiguous run (`gaps`); the manifest is then what a
    single-process harvest of the same config would have written.
    """
    p = Path(path)
    manifest = read_manifest(p)
    shards = finished_shards(p, manifest)
    if complete:
        problems = gaps(shards, manifest.get("shard_seqs"))
        if problems:
            raise SaekitError(f"{p}: the ranks finished but {'; '.join(problems)}; rerun the same harvest command to fill them")
    totals = {name: RunningStats(int(h["width"])) for name, h in manifest["hooks"].items()}
    for s in shards:
        with h5py.File(p / s["file"], "r") as h5:
            for name, tot in totals.items():
                tot.merge(RunningStats.from_arrays({k: h5[f"stats/{name}/{k}"][()] for k in STAT_KEYS}))
    manifest["shards"] = shards
    manifest["stats"] = {name: tot.summary() for name, tot in totals.items()}
    manifest["complete"] = bool(complete)
    write_json_atomic(p / MANIFEST, manifest)
    for f in _progress_files(p):
        f.unlink()
    return manifest


# --------------------------------------------------------------------------- writer


class StoreWriter:
    """Append sequences to a store; a background thread converts, checks and writes them.

    `write(tokens, acts)` only enqueues (bounded queue, so memory stays flat), so writing
    shard k overlaps the forward passes for shard k+1.  Shard `i` always holds global
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
        self.totals = {h.name: RunningStats(h.width) for h in hooks}
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
        self._cur_tmp: Path | None = None
        self._cur_index = 0
        self._filled = 0
        self._shard_stats: dict[str, RunningStats] = {}
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="saekit-store-writer", daemon=True)
        self._thread.start()

    # -- state
    @property
    def n_done(self) -> int:
        """Sequences in finished shards (where a resumed harvest starts)."""
        return sum(s["n_seq"] for s in self.manifest["shards"])

    def _rebuild_totals(self) -> None:
        for s in self.manifest["shards"]:
            f = self.path / s["file"]
            if not f.is_file():
                raise SaekitError(f"{self.path}: finished shard {s['file']} is missing; re-harvest into a new --out")
            with h5py.File(f, "r") as h5:
                for name, tot in self.totals.items():
                    tot.merge(RunningStats.from_arrays({k: h5[f"stats/{name}/{k}"][()] for k in STAT_KEYS}))

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
        self.manifest["stats"] = {name: tot.summary() for name, tot in self.totals.items()}
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
            if isinstance(item, str):
                try:
                    if item == "close" and self._error is None and self._cur is not None:
                        self._finish_shard()
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self._fail(e)
                self._discard_tmp()
                return
            if self._error is not None:
                continue  # drain until told to stop
            try:
                self._append(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self._error = e
        self._discard_tmp()

    def _discard_tmp(self) -> None:
        if self._cur is not None:
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
        f.attrs.update({"format": FORMAT, "index": index, "first_seq": index * self.shard_seqs, "chunk_seqs": c})
        f.create_dataset("tokens", shape=(n, ctx), maxshape=(None, ctx), dtype=np.int32, chunks=(c, ctx), track_times=False)
        store_dt = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[self.dtype]
        for h in self.hooks:
            ds = f.create_dataset(f"acts/{h.name}", shape=(n, ctx, h.width), maxshape=(None, ctx, h.width), dtype=store_dt, chunks=(c, ctx, h.width), track_times=False)
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
            self._cur["tokens"][a:b] = tokens
            for name, arr in stored.items():
                self._cur[f"acts/{name}"][a:b] = arr
        except OSError as e:
            raise self._os_error(e) from e
        self._filled = b

    def _finish_shard(self) -> None:
        f, tmp = self._cur, self._cur_tmp
        n = self._filled
        try:
            if n < self.shard_seqs:
                f["tokens"].resize(n, axis=0)
                for h in self.hooks:
                    f[f"acts/{h.name}"].resize(n, axis=0)
            f.attrs["n_seq"] = n
            for name, st in self._shard_stats.items():
                for k, v in st.arrays().items():
                    f.create_dataset(f"stats/{name}/{k}", data=v, track_times=False)
            tokens = f["tokens"][:]
            f.close()
            self._cur = None
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            final = self.path / shard_name(self._cur_index)
            os.replace(tmp, final)
            self._cur_tmp = None
        except OSError as e:
            raise self._os_error(e) from e
        for name, st in self._shard_stats.items():
            self.totals[name].merge(st)
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


# --------------------------------------------------------------------------- reader


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
    def _file(self, i: int) -> h5py.File:
        if self._pid != os.getpid():  # h5py handles must not cross a fork
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(i)
        if f is None:
            p = self.path / self.manifest["shards"][i]["file"]
            try:
                f = self._files[i] = h5py.File(p, "r")
            except (FileNotFoundError, OSError) as e:
                raise SaekitError(f"cannot read shard {p} ({e}); run `saekit info {self.path} --verify`") from None
        return f

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
    ) -> "BatchStream":
        """Endless shuffled batches {hook: float32 tensor [batch_size, width]} (same rows for every hook)."""
        return BatchStream(self, self._hook_list(hooks), batch_size, split, seed, buffer_rows, start_batch, rank, world_size)

    # -- lifetime
    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, hooks={self.hooks}, n_sequences={self.n_sequences})"


class BatchStream:
    """The iterator `ActivationStore.batches` returns; `peak_rows` records the most rows the buffer ever held."""

    def __init__(self, store: ActivationStore, hooks, batch_size, split, seed, buffer_rows, start_batch, rank, world_size):
        if batch_size < 1:
            raise SaekitError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise SaekitError(f"rank {rank} is not in 0..{world_size - 1}")
        if start_batch < 0:
            raise SaekitError(f"start_batch must be >= 0, got {start_batch}")
        ctx = store.context_size
        if buffer_rows < batch_size + ctx:
            raise SaekitError(f"buffer_rows={buffer_rows} is too small: it must hold a batch plus one sequence ({batch_size + ctx} rows)")
        self.store, self.hooks, self.batch_size = store, hooks, batch_size
        self.seed, self.buffer_rows, self.rank, self.world_size = seed, buffer_rows, rank, world_size
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

    def _load(self, fill: list[int]) -> int:
        if self._buf is None:
            self._buf = {h: np.empty((self.buffer_rows, self.store.hook_width(h)), np.float32) for h in self.hooks}
        n = 0
        for u in fill:
            a, b = self.units[u]
            mask = self.store.row_mask(self.store.read_tokens(a, b)).reshape(-1)
            k = int(mask.sum())
            for h in self.hooks:
                acts = self.store.read_acts(h, a, b)
                self._buf[h][n : n + k] = acts.reshape(-1, acts.shape[-1])[mask]
            n += k
            self.peak_rows = max(self.peak_rows, n)
        return n

    def _generate(self, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        bs = self.batch_size
        epoch = 0
        while True:
            for fi, fill in enumerate(self._fills(epoch)):
                n_batches = int(self.unit_rows[fill].sum()) // bs
                if skip >= n_batches:
                    skip -= n_batches
                    continue
                n = self._load(fill)
                perm = np.random.default_rng([self.seed, self.rank, epoch, fi, 1]).permutation(n)
                for b in range(skip, n_batches):
                    idx = perm[b * bs : (b + 1) * bs]
                    self.batch_index += 1
                    yield {h: torch.from_numpy(self._buf[h][idx]) for h in self.hooks}
                skip = 0
            epoch += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self._gen)


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
    return problems
