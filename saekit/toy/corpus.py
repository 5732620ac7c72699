"""Write a toy corpus as text (for `saekit harvest --packing doc`) with its labels beside it.

Each line is one sequence of exactly ctx−1 digits: harvesting with `--packing doc` and
`--context-size ctx` puts BOS + the line in one stored sequence, so stored position t is
token t of the generated sequence and the labels line up with the store's tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from saekit.errors import SaekitError
from saekit.runs import atomic
from saekit.toy.fsm import generate, load_fsm, save_labels, to_text


@dataclass
class ToyDataConfig:
    """A toy corpus: how many sequences, how long, from which toy model's FSM."""

    out: str = ""
    """Text file to write (one sequence a line); labels go to <out minus suffix>.labels.safetensors."""
    n_seq: int = 2000
    """Number of sequences (lines)."""
    seq_len: int = 0
    """Tokens per sequence including BOS, so each line has seq_len−1 digits (0: the model's context length)."""
    seed: int = 0
    """Seed of the walks."""
    model: str = "toy"
    """Toy model whose FSM generates the walks (`toy` or a directory made by `saekit toy train`)."""

    def __post_init__(self):
        if self.n_seq < 1:
            raise ValueError(f"n_seq={self.n_seq} must be at least 1")
        if self.seq_len != 0 and self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be at least 2 (BOS and one digit), or 0 for the model's context")


def labels_path(text_path: str | os.PathLike) -> Path:
    """Where `saekit toy data` puts the labels of a corpus file."""
    p = Path(text_path)
    return p.with_name(p.stem + ".labels.safetensors")


def check_packing(data: str | None, packing: str, seq_len: int, fix: str) -> None:
    """Refuse to read a `saekit toy data` corpus (its labels file lies beside it) other than one walk per
    sequence: concatenated walks put BOS mid-sequence and break the digit pairs' parity, so every
    number computed on them (losses, codes, FSM states) would be silently wrong.  `fix` says what to
    pass instead ({n} = the walks' length)."""
    if not data or not Path(data).is_file() or not labels_path(data).is_file():
        return
    from safetensors import safe_open

    with safe_open(str(labels_path(data)), "np") as f:
        if (f.metadata() or {}).get("format") != "saekit-toy-labels":
            return
        walk_len = int(f.get_slice("tokens").get_shape()[1])
    if packing != "doc" or seq_len < walk_len:
        raise SaekitError(
            f"{data} is a toy corpus (labels in {labels_path(data).name}): read it one walk per sequence so positions "
            f"line up with the FSM; {fix.format(n=walk_len)}"
        )


def model_context(model: str) -> int:
    """Context length of a toy model directory (config.json's n_positions, GPT-2, or max_position_embeddings, GPT-NeoX)."""
    from saekit.models import resolve_model_path

    cfg = Path(resolve_model_path(model)) / "config.json"
    try:
        c = json.loads(cfg.read_text())
        return int(c["n_positions"] if "n_positions" in c else c["max_position_embeddings"])
    except (OSError, KeyError, ValueError) as e:
        raise SaekitError(f"cannot read the context length from {cfg} ({e}); pass --seq-len") from None


def write_corpus(cfg: ToyDataConfig) -> tuple[Path, Path, int]:
    """Generate and write the corpus and labels; returns (text file, labels file, seq_len)."""
    if not cfg.out:
        raise SaekitError("no output file; pass --out FILE")
    fsm = load_fsm(cfg.model)
    n_ctx = model_context(cfg.model)
    seq_len = cfg.seq_len or n_ctx
    if seq_len > n_ctx:
        raise SaekitError(f"--seq-len {seq_len} is longer than the model's context ({n_ctx}); pass --seq-len {n_ctx} or less")
    tokens, labels = generate(fsm, cfg.n_seq, seq_len, seed=cfg.seed)
    out = Path(cfg.out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True)
    with atomic(out) as tmp:  # the labels are written first, so the text never exists without them
        tmp.write_text("\n".join(to_text(tokens)) + "\n")
        lab = save_labels(labels_path(out), tokens, labels, fsm)
    return out, lab, seq_len
