"""The corpus: the `.py` files of the running Python's standard library, one document per file.

Files are listed in sorted order from `sysconfig`'s stdlib path, leaving out site-packages,
the test suites and IDLE (tests are a third of the library and mostly boilerplate).  The
held-out split is fixed by a hash of each file's path relative to the library, so it does
not depend on the order or number of files; a different Python version has somewhat different
files, which is why a model's README records the version it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from saekit.errors import SaekitError

SPLITS = ("train", "heldout", "all")
SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(rel: str, heldout_percent: int = 10) -> str:
    """'heldout' for about heldout_percent% of files (by a hash of the relative path), else 'train'."""
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "little") % 100
    return "heldout" if h < heldout_percent else "train"


def files(split: str = "all", root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of the corpus's files in `split`, sorted."""
    if split not in SPLITS:
        raise SaekitError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    root = root or stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if SKIP_PARTS & set(Path(rel).parts[:-1]):
            continue
        if split == "all" or split_of(rel) == split:
            out.append((rel, p))
    if not out:
        raise SaekitError(f"no Python source found under {root}; this Python installation has no standard library sources")
    return out


def documents(split: str = "all", root: Path | None = None) -> list[str]:
    """The files' text (UTF-8; a file that is not is skipped: the stdlib has none, but a patched one might)."""
    docs = []
    for _, p in files(split, root):
        try:
            docs.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return docs


@dataclass
class PyDataConfig:
    """Write the corpus as a .jsonl file (one file per line, field `text`) for `saekit harvest --data`."""

    out: str = ""
    """Output .jsonl file."""
    split: str = "heldout"
    """Which files: heldout (never trained on), train or all."""
    max_docs: int | None = None
    """Keep only the first this many files (default: all)."""

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError("max_docs must be >= 1 when given")


def write_jsonl(cfg: PyDataConfig) -> tuple[Path, int]:
    """Write the corpus file; returns (path, number of documents)."""
    if not cfg.out:
        raise SaekitError("no output file; pass --out FILE.jsonl")
    out = Path(cfg.out)
    if out.suffix != ".jsonl":
        raise SaekitError(f"--out {out} must end in .jsonl (harvest reads one JSON document per line)")
    docs = documents(cfg.split)[: cfg.max_docs]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    tmp.replace(out)
    return out, len(docs)
