"""`ActivationStore` (sequences in order, splits, metadata), its shuffling loader `BatchStream`, and `saekit info`.

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

import math
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from saekit.errors import SaekitError, did_you_mean
from saekit.models import ModelInfo
from saekit.store.format import MANIFEST, check_shard, from_stored, shard_shape_problem, gaps, read_manifest, row_mask, sha256_file


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
                f = h5py.File(p, "r")
            except (FileNotFoundError, OSError) as e:
                raise SaekitError(f"cannot read shard {p} ({e}); run `saekit info {self.path} --verify`") from None
            self._files[i] = check_shard(self.path, self.manifest["shards"][i], self.manifest, f)  # once per shard per run
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
        else:
            try:
                with h5py.File(f, "r") as h5:
                    why = shard_shape_problem(s, m, h5)
            except OSError as e:
                why = f"not a readable HDF5 file ({e})"
            if why:
                problems.append(f"{s['file']}: {why}")
    return problems
