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

from saekit.errors import SaekitError
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
