"""What every trainer writes: atomic files, checkpoints with resume, the identity hash, the metrics log.

A leaf (imports torch, safetensors and saekit.errors only), used by the offline trainer,
e2e and finetune alike, so a run folder looks and resumes the same whoever wrote it.

- `atomic(path)`: the one write-to-temp-then-rename; a crash never leaves a half-written
  file (or folder) under its final name.
- Checkpoints: a folder `step-NNNNNNNN/` holding `state.safetensors` + `state.json` (never
  pickle).  The JSON records the tensors' sha256, checked on read, so a checkpoint damaged
  after it was written (disk, copy, an editor) is named in a warning and the one before it
  is used; a checkpoint written under another identity is refused.
- `identity_hash`: the hash of the config fields that change what a run computes; a resume
  under other values is refused, naming the fields.
- `MetricsLog`: `metrics.jsonl`, one JSON line per logging step; a resume drops the lines
  after its checkpoint so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saekit.errors import SaekitError

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
KEEP_CHECKPOINTS = 2
"""Checkpoints kept per run: the newest and one to fall back on."""


# --- atomic writes ---------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    Works for a file or a folder (whatever the body creates at the temporary path).  The
    temporary name is unique, so two writers never clobber each other's half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")  # suffix kept: savefig reads it
    try:
        yield tmp
        _user_permissions(tmp)
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _read_umask() -> int:
    mask = os.umask(0o022)  # read at import, before any thread runs: os.umask can only be read by setting it
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()
"""What a file the user creates gets: some writers (safetensors) make theirs owner-only (0600)."""


def _user_permissions(tmp: Path) -> None:
    """Give every file written at `tmp` the user's normal permissions (as the JSON beside it has)."""
    for f in ([tmp] if tmp.is_file() else tmp.rglob("*") if tmp.is_dir() else []):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, FILE_MODE)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`path` holds `text`, all or nothing."""
    with atomic(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- identity --------------------------------------------------------------------------------------

def identity_hash(cfg: dict, fields: tuple[str, ...], **extra) -> str:
    """Hash of cfg's `fields` (+ `extra`): what a run computes; a checkpoint under another identity is refused."""
    ident = {k: cfg[k] for k in fields} | extra
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def changed_fields(old: dict, new: dict, fields: tuple[str, ...]) -> list[str]:
    return [k for k in fields if old.get(k) != new.get(k)]


# --- checkpoints -----------------------------------------------------------------------------------

def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def checkpoint_steps(root: Path) -> list[int]:
    """Steps of the checkpoints under `root`, oldest first (a folder exists once it is complete)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit())


def save_checkpoint(root: Path, step: int, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Write `root/step-N/` (tensors + meta, the tensors' sha256 recorded) atomically; keep the last two."""
    folder = checkpoint_dir(root, step)
    with atomic(folder) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / STATE_TENSORS)
        meta = meta | {"step": step, "sha256": sha256_file(tmp / STATE_TENSORS)}
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1))
    for old in checkpoint_steps(root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(checkpoint_dir(root, old), ignore_errors=True)
    return folder


def read_checkpoint(folder: Path, device: str = "cpu") -> tuple[dict[str, Tensor], dict]:
    """(tensors, meta) of one checkpoint, verified against its recorded checksum; ValueError/OSError if damaged."""
    meta = json.loads((folder / STATE_JSON).read_text())
    if "sha256" in meta and sha256_file(folder / STATE_TENSORS) != meta["sha256"]:
        raise ValueError(f"{STATE_TENSORS} does not match the checksum recorded when it was written")
    return load_file(str(folder / STATE_TENSORS), device=device), meta


def try_read_checkpoint(folder: Path, device: str = "cpu") -> tuple[dict[str, Tensor], dict] | None:
    """`read_checkpoint`, or None with a warning naming the folder when it is damaged."""
    try:
        return read_checkpoint(folder, device)
    except (OSError, ValueError) as e:
        warnings.warn(f"checkpoint {folder} is damaged ({e}); resuming from the one before it", stacklevel=2)
        return None


def latest_checkpoint(root: Path, device: str = "cpu") -> tuple[int, dict[str, Tensor], dict] | None:
    """(step, tensors, meta) of the newest readable checkpoint under `root`, or None when there is none.

    A damaged one is named in a warning and the one before it is used; when every one is
    damaged the error says how to start over.
    """
    steps = checkpoint_steps(root)
    for step in reversed(steps):
        got = try_read_checkpoint(checkpoint_dir(root, step), device)
        if got is not None:
            return step, *got
    if steps:
        raise SaekitError(f"every checkpoint in {root} is damaged (see the warnings); delete it and rerun without --resume")
    return None


def check_identity(folder: Path, meta: dict, ident: str, cfg: dict, fields: tuple[str, ...], config_key: str = "config",
                   unnamed: str = "unknown") -> None:
    """Refuse a checkpoint written under another identity, naming the fields that differ."""
    if meta.get("identity") != ident:
        diff = changed_fields(meta.get(config_key, {}), cfg, fields)
        raise SaekitError(f"{folder} was written with other settings ({', '.join(diff) or unnamed} differ); "
                          "rerun with the original options or choose another --out")


# --- run folder layout: the ONE place that names a dictionary run's files (save and resume) ------

class RunPaths(NamedTuple):
    dir: Path
    """<out>/<hook>/<name>/: the dictionary folder (config.json + weights.safetensors)."""
    metrics: Path
    """metrics.jsonl: one JSON line per logging step."""
    checkpoints: Path
    """checkpoints/step-NNNNNNNN/{state.safetensors,state.json}."""

    def checkpoint(self, step: int) -> Path:
        return checkpoint_dir(self.checkpoints, step)

    def checkpoint_steps(self) -> list[int]:
        return checkpoint_steps(self.checkpoints)


def run_name(kind: str, k: int | None, l1: float | None, groups: int = 1) -> str:
    if kind == "relu":
        return f"relu-l1_{l1:g}"
    return f"{kind}-k{k}" + (f"-g{groups}" if groups > 1 else "")


def run_paths(out: str | os.PathLike, hook: str, name: str) -> RunPaths:
    d = Path(out) / hook / name
    return RunPaths(d, d / "metrics.jsonl", d / "checkpoints")


# --- optimiser state as tensors (no pickle) --------------------------------------------------------

def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list]:
    """The optimiser's state as flat `opt.{param index}.{name}` tensors plus its param_groups (JSON)."""
    osd = opt.state_dict()
    t = {f"opt.{idx}.{name}": v if torch.is_tensor(v) else torch.tensor(v) for idx, st in osd["state"].items() for name, v in st.items()}
    return t, osd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, t: dict[str, Tensor], param_groups: list) -> None:
    """Inverse of `optimizer_tensors`; keys of `t` not starting with `opt.` are ignored."""
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v  # Optimizer.load_state_dict places `step` itself
    opt.load_state_dict({"state": state, "param_groups": param_groups})


# --- metrics log -----------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl: one JSON object per logging step (each with a "step")."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def start(self) -> None:
        """An empty log for a fresh run."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def append(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def truncate(self, step: int, keep=lambda row: True) -> None:
        """Drop the lines after `step` (among those `keep` selects): a resumed run writes them again."""
        if not self.path.exists():
            return
        rows = [ln for ln in self.path.read_text().splitlines() if ln]
        kept = [ln for ln in rows if not keep(json.loads(ln)) or json.loads(ln)["step"] <= step]
        write_text(self.path, "".join(ln + "\n" for ln in kept))
