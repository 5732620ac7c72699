"""What a store is on disk (format `saekit-activations` v1): names, constants, the manifest, statistics.

Everything here is shared by the writer (`saekit.store.writer`), the reader
(`saekit.store.reader`) and harvest's resume logic, so a file name or a manifest field is
spelled in one place.  The manifest is the only list of finished shards: a file it does
not name does not exist as far as readers and resumes are concerned.

Rows: one token's activation vector.  Padding rows never count; the BOS position is
excluded by default (`rows.exclude_bos`) because its activations are huge outliers in
most models and carry no information about text.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from saekit import outdir, schema
from saekit.errors import SaekitError
from saekit.tokens import PAD, row_mask  # noqa: F401  (row_mask: part of saekit.store's names)

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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SaekitError(f"{mp} is not a {FORMAT} manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if isinstance(manifest.get("version"), int) and manifest["version"] > VERSION:
        raise SaekitError(f"{p} is store version {manifest['version']}; this saekit reads up to {VERSION}: upgrade saekit")
    return check_manifest(manifest, mp)


_MANIFEST = {
    "version": schema.Int(min=1), "model": schema.Field("dict"), "hooks": schema.Field("dict"), "dtype": schema.Str(choices=DTYPES),
    "context_size": schema.Int(min=1), "bos_id": schema.Int(min=0, required=False, null=True), "rows": schema.Field("dict", required=False),
    "holdout": schema.Field("dict", required=False), "stats": schema.Field("dict", required=False), "shards": schema.Field("list"),
    "shard_seqs": schema.Int(min=1, required=False), "complete": schema.Field("bool", required=False),
    "config_hash": schema.Str(required=False), "config": schema.Field("dict", required=False),
}
# n_layers and d_vocab are 0 in the placeholder model of a store made without one (store import, synth).
_MODEL = {"name": schema.Str(), "fingerprint": schema.Str(), "d_model": schema.Int(min=1), "n_layers": schema.Int(min=0),
          "n_ctx": schema.Int(min=1), "d_vocab": schema.Int(min=0), "compat": schema.Field("bool", required=False)}
_HOOK = {"width": schema.Int(min=1), "shape": schema.Field("list"), "layer": schema.Int(min=-1)}
_STATS = {"count": schema.Int(min=0), "mean": schema.Field("list"), "mean_norm": schema.Num(min=0), "mean_sq_norm": schema.Num(min=0),
          "total_var": schema.Num(min=0, required=False), "scale": schema.Num(above=0)}
_SHARD = {"file": schema.Str(), "n_seq": schema.Int(min=0), "n_tokens": schema.Int(min=0), "n_rows": schema.Int(min=0), "sha256": schema.Str()}


def check_manifest(m: dict, where: Path) -> dict:
    """A manifest's fields against the format (types, ranges, widths, shard names confined to the store's folder)."""
    w = str(where)
    schema.check(m, _MANIFEST, w)
    schema.check(m["model"], _MODEL, w, prefix="model.")
    schema.check(m.get("rows", {}), {"exclude_bos": schema.Field("bool", required=False)}, w, prefix="rows.")
    schema.check(m.get("holdout", {}), {"fraction": schema.Num(min=0, max=0.99, required=False)}, w, prefix="holdout.")
    for name, h in m["hooks"].items():
        schema.check(h, _HOOK, w, prefix=f"hooks.{name}.")
        if not all(type(d) is int and d > 0 for d in h["shape"]) or math.prod(h["shape"]) != h["width"]:
            raise SaekitError(f"{w}: hook {name} has shape {h['shape']} but width {h['width']}; the manifest is damaged")
    for name, st in m.get("stats", {}).items():
        if name not in m["hooks"]:
            raise SaekitError(f"{w}: statistics for {name!r}, which is not one of the store's hooks; the manifest is damaged")
        schema.check(st, _STATS, w, prefix=f"stats.{name}.")
        if len(st["mean"]) != m["hooks"][name]["width"]:
            raise SaekitError(f"{w}: stats.{name}.mean has {len(st['mean'])} entries, the hook's width is {m['hooks'][name]['width']}; the manifest is damaged")
    for i, sh in enumerate(m["shards"]):
        schema.check(sh, _SHARD, w, prefix=f"shards[{i}].")
        f = sh["file"]
        if Path(f).name != f or f in (".", "..") or "\\" in f:
            raise SaekitError(f"{w}: shard path {f!r} is not a file name inside the store; a manifest may only name its own shards")
    return m


def shard_shape_problem(entry: dict, manifest: dict, h5) -> str | None:
    """Why an open shard's datasets do not have the shapes its manifest entry and the hooks' widths say (None if they do)."""
    n, ctx = entry["n_seq"], manifest["context_size"]
    want = {"tokens": (n, ctx)} | {f"acts/{h}": (n, ctx, v["width"]) for h, v in manifest["hooks"].items()}
    for name, shape in want.items():
        got = tuple(h5[name].shape) if name in h5 else None
        if got != shape:
            return f"dataset {name} has shape {got}, the manifest says {shape}"
    return None


def check_shard(store: Path, entry: dict, manifest: dict, h5):
    """Before a shard is first read in this process: its checksum and its datasets' shapes against the manifest.

    Hashing costs one extra read of the file, once per shard per run (remembered by path,
    size and mtime), so a flipped byte stops the run naming the shard instead of training on it.
    Returns the open file `h5`; closes it when the shard is refused.
    """
    try:
        _check_shard(store, entry, manifest, h5)
    except BaseException:
        h5.close()
        raise
    return h5


def _check_shard(store: Path, entry: dict, manifest: dict, h5) -> None:
    p = store / entry["file"]
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, entry["sha256"])
    if key in _VERIFIED:
        return
    fix = f"run `saekit info {store} --verify`, then re-harvest into a new --out"
    if sha256_file(p) != entry["sha256"]:
        raise SaekitError(f"shard {p} is damaged (checksum mismatch: it differs from the manifest); {fix}")
    why = shard_shape_problem(entry, manifest, h5)
    if why:
        raise SaekitError(f"shard {p}: {why}; the manifest was edited or the store is damaged; {fix}")
    _VERIFIED.add(key)


_VERIFIED: set[tuple] = set()


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
        if p.is_dir() and any(not (f.name.endswith(TMP_SUFFIX) or outdir.is_lock(f.name)) for f in p.iterdir()):
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


def read_shard_stats(h5, names) -> dict[str, RunningStats]:
    """The statistics a shard file holds for each hook in `names` (an open h5py.File)."""
    return {name: RunningStats.from_arrays({k: h5[f"stats/{name}/{k}"][()] for k in STAT_KEYS}) for name in names}


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
        check_manifest(part, f)  # the same shape as the manifest, and as little to be trusted
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
            for name, st in read_shard_stats(h5, totals).items():
                totals[name].merge(st)
    manifest["shards"] = shards
    manifest["stats"] = {name: tot.summary() for name, tot in totals.items()}
    manifest["complete"] = bool(complete)
    write_json_atomic(p / MANIFEST, manifest)
    for f in _progress_files(p):
        f.unlink()
    return manifest


def has_tokens(manifest: dict) -> bool:
    """False for a store made from bare activations (`saekit store import`, `saekit synth`): no text, no model."""
    return manifest.get("origin", {}).get("tokens", True) is not False


def require_tokens(manifest: dict, path, command: str) -> None:
    """Refuse, in one line, a token-less store where `command` needs the text and the model it came from."""
    if not has_tokens(manifest):
        kind = manifest.get("origin", {}).get("kind", "import")
        raise SaekitError(f"store {path} holds activations without tokens or a model (made by `saekit {'synth' if kind == 'synth' else 'store import'}`); "
                          f"{command} needs a harvested store (`saekit harvest`)")
