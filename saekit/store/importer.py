"""`saekit store import`: activations made elsewhere (a `.npy`, a `.safetensors`, a folder of them) become a store.

The result is an ordinary store written by `StoreWriter` (same statistics, checksums,
eval split), so training, evaluation and analysis treat it like a harvested one.  It has
no tokens and no model: the manifest says so (`origin.tokens = false`, see
`format.has_tokens`), and commands that need text (splice-eval, analyze) refuse it with
one line.  Rows are streamed in chunks, so memory stays flat whatever the file's size.

Shapes: `[n, d]` rows are packed into pseudo-sequences of `context_size` rows (the tail
padded, padding never counts); `[n_seq, ctx, d]` keeps its sequences.  `write_rows_store`
is the shared back end (the synthetic generator, `saekit.synth`, uses it too).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saekit.errors import SaekitError
from saekit.models import HookSpec, ModelInfo, hook_layer
from saekit.store.format import DTYPES
from saekit.store.writer import StoreWriter
from saekit.text import PAD

SUFFIXES = (".npy", ".safetensors")
PARTIAL = ".partial"


@dataclass
class ImportConfig:
    """What `saekit store import` reads and where it writes the store."""

    acts: str = ""
    """A .npy file, a .safetensors file (one tensor, or one per hook named by its key) or a folder of them (concatenated in name order); shape (n, d) or (n_seq, ctx, d)."""
    hooks: list[str] = field(default_factory=list, metadata={"aliases": ["--hook"]})
    """Hook name(s) to store under: the name for a single array, or which keys of a per-hook .safetensors to keep (default: every key)."""
    out: str = ""
    """Store directory to create (must not exist, or be empty)."""
    context_size: int = 128
    """For [n, d] rows: rows per stored pseudo-sequence (the unit of the eval split and of shuffled reads)."""
    dtype: str = ""
    """Stored dtype: float16, bfloat16 or float32 (default: the input's, float32 for float64)."""
    holdout: float = 0.05
    """Share of sequences kept as the eval split (the last ones)."""
    shard_tokens: int = 1 << 20
    """Rows per shard file (rounded to whole sequences)."""
    chunk_rows: int = 1 << 16
    """Rows read and written at a time: the memory bound."""

    def __post_init__(self):
        if not self.acts:
            raise ValueError("acts is required: the file or folder of activations (--acts FILE)")
        if not self.out:
            raise ValueError("out is required: the store directory to create (--out DIR)")
        if self.context_size < 1 or self.shard_tokens < 1 or self.chunk_rows < 1:
            raise ValueError("context_size, shard_tokens and chunk_rows must be positive")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout {self.holdout} must be in [0, 1)")
        if self.dtype and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


# --------------------------------------------------------------------------- sources


@dataclass
class _Part:
    """One array in one file, read by slices of its first axis."""

    file: Path
    key: str | None  # None: a .npy file
    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self, a: int, b: int) -> torch.Tensor:
        if self.key is None:
            arr = np.load(self.file, mmap_mode="r")
            return torch.from_numpy(np.array(arr[a:b]))
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            return f.get_slice(self.key)[a:b]


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _parts_of(file: Path) -> dict[str | None, _Part]:
    """The arrays in one file, by key (None for a .npy)."""
    if file.suffix == ".npy":
        try:
            arr = np.load(file, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise SaekitError(f"cannot read {file} as .npy ({e}); save it with numpy.save") from None
        if arr.dtype.kind != "f":
            raise SaekitError(f"{file} holds {arr.dtype} values; activations must be floating point (cast with .astype(np.float32))")
        return {None: _Part(file, None, tuple(arr.shape), torch.from_numpy(np.zeros(0, arr.dtype)).dtype)}
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                dt = sl.get_dtype()
                if dt not in _ST_DTYPES:
                    raise SaekitError(f"{file}: tensor {key!r} is {dt}; activations must be floating point (F16, BF16, F32 or F64)")
                out[key] = _Part(file, key, tuple(sl.get_shape()), _ST_DTYPES[dt])
            return out
    except SaekitError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise SaekitError(f"cannot read {file} as .safetensors ({e})") from None


def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise SaekitError(f"--acts {path} does not exist")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise SaekitError(f"--acts {path}: unsupported file type {path.suffix!r}; use .npy or .safetensors")
        return [path]
    files = sorted(f for f in path.iterdir() if f.suffix in SUFFIXES and f.is_file())
    if not files:
        raise SaekitError(f"--acts {path} is a folder with no .npy or .safetensors files")
    return files


def open_sources(path: str | Path, hooks: list[str]) -> dict[str, list[_Part]]:
    """hook → the parts to concatenate along the first axis, checked for rank and matching shapes."""
    by_hook: dict[str, list[_Part]] = {}
    for file in _files(Path(path)):
        parts = _parts_of(file)
        if list(parts) == [None] or len(parts) == 1:
            if len(hooks) > 1:
                raise SaekitError(f"{file} holds one array but {len(hooks)} hooks were named; name one --hook")
            (key, part), = parts.items()
            name = hooks[0] if hooks else (key or "acts")
            by_hook.setdefault(name, []).append(part)
            continue
        keep = hooks or sorted(parts)
        missing = [h for h in keep if h not in parts]
        if missing:
            raise SaekitError(f"{file} has no tensor {', '.join(map(repr, missing))}; it has {', '.join(sorted(parts))}")
        for h in keep:
            by_hook.setdefault(h, []).append(parts[h])
    for name, parts in by_hook.items():
        for p in parts:
            if len(p.shape) not in (2, 3):
                raise SaekitError(f"{p.file}{'' if p.key is None else ':' + p.key} has shape {list(p.shape)}; "
                                  "activations must be [n, d] or [n_seq, ctx, d]")
        tails = {p.shape[1:] for p in parts}
        if len(tails) > 1:
            raise SaekitError(f"hook {name!r}: files disagree on the shape after the first axis ({sorted(tails)}); "
                              "every file must hold the same [*, d] or [*, ctx, d]")
    lengths = {name: sum(p.shape[0] for p in parts) for name, parts in by_hook.items()}
    ranks = {len(parts[0].shape) for parts in by_hook.values()}
    if len(set(lengths.values())) > 1 or len(ranks) > 1:
        raise SaekitError(f"hooks disagree on the number of rows ({lengths}); each hook needs one row per position")
    return by_hook


def _read(parts: list[_Part], a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of the concatenation of `parts`."""
    out, base = [], 0
    for p in parts:
        n = p.shape[0]
        lo, hi = max(a, base), min(b, base + n)
        if lo < hi:
            out.append(p.read(lo - base, hi - base))
        base += n
    return torch.cat(out) if len(out) > 1 else out[0]


# --------------------------------------------------------------------------- the shared writer


def write_rows_store(
    out: str | Path,
    widths: dict[str, int],
    chunks: Callable[[Path], Iterator[dict[str, torch.Tensor]]],
    *,
    context_size: int,
    dtype: str,
    holdout: float,
    shard_tokens: int,
    origin: dict,
    sequences: bool = False,
) -> Path:
    """Write a token-less store from chunks {hook: float [m, width]} (rows) or [m, ctx, width] (`sequences`).

    `chunks(folder)` makes the iterator; `folder` is where the store is being written, for
    files that belong beside it (the synthetic world's truth).
    Written under `<out>.partial` and renamed when complete, so `out` is either absent or a
    finished store; a failure removes the partial folder.  Non-finite values are refused
    with the chunk's row range.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SaekitError(f"--out {out} exists and is not empty; choose a new directory")
    tmp = out.with_name(out.name + PARTIAL)
    if tmp.exists():
        shutil.rmtree(tmp)  # a killed earlier import: nothing in it was ever final
    first = next(iter(widths.values()))
    made_by = "saekit synth" if origin.get("kind") == "synth" else "saekit store import"
    # A placeholder: a command that loads "the store's model" then names the reason it cannot.
    info = ModelInfo(name=f"none: activations from `{made_by}` have no model; pass --model", fingerprint="", d_model=first, n_layers=0,
                     n_ctx=context_size, d_vocab=0)
    header = {
        "model": info.to_dict(),
        "bos_id": None,
        "rows": {"exclude_bos": False, "pad_token": PAD},
        "origin": {**origin, "tokens": False},
        "holdout": {"fraction": holdout},
    }
    specs = [HookSpec(name, hook_layer(name), [w]) for name, w in widths.items()]
    ctx = context_size
    writer = StoreWriter(tmp, header=header, hooks=specs, context_size=ctx, dtype=dtype,
                         shard_seqs=max(1, shard_tokens // ctx), background=False)
    done = 0
    try:
        pending: dict[str, torch.Tensor] | None = None  # rows not yet filling a whole sequence
        for chunk in chunks(tmp):
            for name, x in chunk.items():
                if not torch.isfinite(x).all():
                    bad = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero()[0])
                    raise SaekitError(f"hook {name!r}: NaN or inf at row {done + bad}; clean the activations before importing")
            m = next(iter(chunk.values())).shape[0]
            if sequences:
                writer.write(np.zeros((m, ctx), np.int32), {k: v.float() for k, v in chunk.items()})
            else:
                if pending is not None:
                    chunk = {k: torch.cat([pending[k], v]) for k, v in chunk.items()}
                n = next(iter(chunk.values())).shape[0]
                whole = n // ctx * ctx
                if whole:
                    writer.write(np.zeros((whole // ctx, ctx), np.int32),
                                 {k: v[:whole].float().reshape(-1, ctx, v.shape[-1]) for k, v in chunk.items()})
                pending = {k: v[whole:] for k, v in chunk.items()} if whole < n else None
            done += m
        if not sequences and pending is not None:  # the last partial sequence, padded
            r = next(iter(pending.values())).shape[0]
            tokens = np.full((1, ctx), PAD, np.int32)
            tokens[0, :r] = 0
            acts = {}
            for k, v in pending.items():
                full = torch.zeros(1, ctx, v.shape[-1])
                full[0, :r] = v.float()
                acts[k] = full
            writer.write(tokens, acts)
        if done == 0:
            raise SaekitError("no rows to import: the arrays are empty")
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_dtype(dtypes: list[torch.dtype]) -> str:
    """The stored dtype that loses nothing: the input's own, float32 for float64 or mixed inputs."""
    names = {str(d).removeprefix("torch.") for d in dtypes}
    if len(names) == 1 and next(iter(names)) in DTYPES:
        return next(iter(names))
    return "float32"


def import_store(cfg: ImportConfig, progress=None) -> Path:
    """Stream `cfg.acts` into a new store at `cfg.out`; returns its path."""
    sources = open_sources(cfg.acts, list(cfg.hooks))
    parts0 = next(iter(sources.values()))
    shape = parts0[0].shape
    n = sum(p.shape[0] for p in parts0)
    sequences = len(shape) == 3
    ctx = shape[1] if sequences else cfg.context_size
    widths = {name: parts[0].shape[-1] for name, parts in sources.items()}
    dtype = cfg.dtype or default_dtype([p.dtype for parts in sources.values() for p in parts])
    step = max(1, cfg.chunk_rows // ctx) if sequences else cfg.chunk_rows

    def chunks(_folder):
        for a in range(0, n, step):
            b = min(n, a + step)
            if progress:
                progress(b, n)
            yield {name: _read(parts, a, b) for name, parts in sources.items()}

    origin = {"kind": "import", "files": [str(f) for f in _files(Path(cfg.acts))], "rows_per_sequence": ctx,
              "sequences": sequences, "n": n}
    return write_rows_store(cfg.out, widths, chunks, context_size=ctx, dtype=dtype, holdout=cfg.holdout,
                            shard_tokens=max(cfg.shard_tokens, ctx), origin=origin, sequences=sequences)
