"""`saekit harvest`: run a frozen model over text and store chosen hooks' activations.

    text files ──(saekit.text)──► token sequences ──(one forward, stopped early)──► StoreWriter ──► store

The forward pass happens here, in the caller's thread; converting, checking and writing
happen in the store's writer thread, so disk work overlaps the next forward.  Batches
never straddle shard boundaries: the shard a resumed run rewrites is made of exactly the
batches an uninterrupted run would have used, so its activations are bit-identical (a
BLAS call with a different batch shape may round differently).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saekit import models, text
from saekit.config import to_dict
from saekit.errors import SaekitError
from saekit.store import DTYPES, StoreWriter, check_existing
from saekit.store import summary as store_summary

# Looked up through the module at call time, so tests can slow a forward down.
capture = models.capture


@dataclass
class HarvestConfig:
    """Which model, hooks and text to harvest, and how to store the activations."""

    model: str = "toy"
    """Hugging Face model name, local Hugging Face-format directory, or `toy` (the built-in toy model)."""
    hooks: list[str] = field(default_factory=list)
    """Hook names, comma-separated (e.g. blocks.1.hook_resid_post,blocks.0.attn.hook_z); see `saekit hooks`."""
    data: str = ""
    """A .txt file (one document per line), a .jsonl file, or a folder of them (read in sorted order)."""
    text_field: str = "text"
    """Field of each JSONL object that holds the document."""
    context_size: int = 128
    """Tokens per sequence, BOS included (at most the model's context length)."""
    packing: str = "concat"
    """concat: documents joined with EOS and cut into sequences; doc: one document per sequence, padded."""
    tokens: int = 0
    """Stop after this many tokens, rounded up to whole sequences (0: all the data)."""
    batch_size: int = 32
    """Sequences per forward pass."""
    dtype: str = "float16"
    """Stored dtype: float16, bfloat16 (range of float32, for models whose activations overflow float16) or float32."""
    shard_tokens: int = 1 << 18
    """Tokens per shard file (rounded down to whole sequences); a killed harvest resumes at a shard boundary."""
    device: str = "cpu"
    """Device for the forward pass (cpu, cuda, cuda:1, mps)."""
    out: str = ""
    """Output directory of the activation store (created; rerun the same command to resume)."""
    seed: int = 0
    """Seeds torch before the forward (harvest order is fixed by the data; this only matters for a stochastic model)."""
    compat: bool = False
    """Apply TransformerLens weight processing (folded LayerNorm etc.) instead of the raw Hugging Face weights."""
    holdout: float = 0.05
    """Fraction of sequences (the last ones) the store's readers treat as the eval split."""

    def __post_init__(self):
        if self.packing not in text.PACKINGS:
            raise ValueError(f"packing {self.packing!r} is not one of {', '.join(text.PACKINGS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.context_size < 2:
            raise ValueError(f"context_size={self.context_size} must be at least 2 (BOS plus one token)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")
        if self.tokens < 0:
            raise ValueError(f"tokens={self.tokens} must be >= 0 (0 means all the data)")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens={self.shard_tokens} must be positive")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout} must be in [0, 1)")

    @property
    def shard_seqs(self) -> int:
        return max(1, self.shard_tokens // self.context_size)

    @property
    def max_sequences(self) -> int | None:
        return math.ceil(self.tokens / self.context_size) if self.tokens else None


def config_identity(cfg: HarvestConfig, model_fingerprint: str, data_fp: list) -> tuple[dict, str]:
    """(config dict, hash) that decide whether an existing store may be resumed.

    `out` is left out so a store can be moved; the model and data fingerprints are in,
    so a changed model or corpus is not silently continued.
    """
    d = to_dict(cfg)
    d.pop("out")
    d["model_fingerprint"] = model_fingerprint
    d["data_files"] = data_fp
    h = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    return d, h


def _batches(seqs, start: int, stop: int | None, batch_size: int, shard_seqs: int):
    """(first index, tokens [n, ctx]) batches from global index `start`, never crossing a shard boundary."""
    i = start
    while stop is None or i < stop:
        n = min(batch_size, shard_seqs - i % shard_seqs)
        if stop is not None:
            n = min(n, stop - i)
        chunk = list(itertools.islice(seqs, n))
        if not chunk:
            return
        yield i, np.stack(chunk)
        i += len(chunk)


def _prefetch(items, size: int):
    """Iterate `items` in a background thread (tokenising overlaps the forward); errors re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for x in items:
                if not put(x):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)

    threading.Thread(target=run, name="saekit-tokenize", daemon=True).start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()


def _progress_bar(total: int | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    class Rate(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return f"{speed:,.0f} tok/s" if speed else "… tok/s"

    cols = [TextColumn("harvest"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), Rate(""), TimeElapsedColumn()]
    bar = Progress(*cols, transient=False)
    return bar, bar.add_task("harvest", total=total)


def harvest(cfg: HarvestConfig, progress: bool = True, model: models.LoadedModel | None = None) -> Path:
    """Harvest `cfg.hooks` of `cfg.model` over `cfg.data` into the store `cfg.out`; returns its path.

    Resumes a store left by a killed run with the same config; refuses one with a
    different config before touching it.  `model` reuses an already loaded model (it must
    be the one `cfg.model` names; benchmarks and pipelines pass it to skip loading).
    """
    if not cfg.out:
        raise SaekitError("no output directory; pass --out DIR")
    if not cfg.hooks:
        raise SaekitError("no hooks given; pass --hooks blocks.0.hook_resid_post (comma-separated for several)")
    out = Path(cfg.out)
    files = text.data_files(cfg.data)
    model_path = models.resolve_model_path(cfg.model)
    config, config_hash = config_identity(cfg, models.fingerprint(model_path), text.data_fingerprint(files))
    resume = check_existing(out, config, config_hash)  # refuses a different config before any work
    if resume and resume.get("complete"):
        return out

    lm = model or models.load_model(cfg.model, compat=cfg.compat, device=cfg.device)
    info = lm.info
    if cfg.context_size > info.n_ctx:
        raise SaekitError(f"context_size {cfg.context_size} is larger than the model's context ({info.n_ctx}); pass --context-size {info.n_ctx} or less")
    specs = models.resolve_hooks(lm, cfg.hooks)
    bos = lm.bos_id
    eos = lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else bos
    seqs = _prefetch(
        text.sequences(cfg.data, lm.tokenizer, cfg.context_size, bos_id=bos, eos_id=eos, packing=cfg.packing, text_field=cfg.text_field),
        size=4 * cfg.batch_size,
    )
    first = next(seqs, None)
    if first is None:
        raise SaekitError(f"no text in {cfg.data}: every document is empty; add documents (or fix --text-field)")
    seqs = itertools.chain([first], seqs)

    header = {
        "model": info.to_dict(),
        "bos_id": bos,
        "rows": {"exclude_bos": True, "pad_token": text.PAD},
        "text": {
            "source": str(cfg.data),
            "files": [str(f) for f in files],
            "text_field": cfg.text_field,
            "packing": cfg.packing,
            "tokenizer": getattr(lm.tokenizer, "name_or_path", "") or type(lm.tokenizer).__name__,
            "eos_id": eos,
        },
        "config": config,
        "config_hash": config_hash,
        "holdout": {"fraction": cfg.holdout},
    }
    writer = StoreWriter(out, header=header, hooks=specs, context_size=cfg.context_size, dtype=cfg.dtype, shard_seqs=cfg.shard_seqs, resume=resume)
    start = writer.n_done
    skipped = sum(1 for _ in itertools.islice(seqs, start))
    if skipped < start:
        writer.abort()
        raise SaekitError(f"{out} already holds {start} sequences but {cfg.data} now yields only {skipped}; choose another --out")

    device = next(lm.bridge.parameters()).device
    names = [s.name for s in specs]
    torch.manual_seed(cfg.seed)
    stop = cfg.max_sequences
    total = stop * cfg.context_size if stop else None
    bar, task = _progress_bar(total) if progress else (None, None)
    ok = False
    try:
        if bar:
            bar.start()
            bar.update(task, completed=start * cfg.context_size)
        for _, toks in _batches(seqs, start, stop, cfg.batch_size, cfg.shard_seqs):
            inp = torch.from_numpy(np.where(toks == text.PAD, bos, toks)).long().to(device)  # PAD never reaches the model
            acts = capture(lm.bridge, inp, names)
            writer.write(toks, acts)
            if bar:
                bar.advance(task, toks.size)
        writer.close()
        ok = True
    finally:
        if not ok:
            writer.abort()
        if bar:
            bar.stop()
    return out


def describe(path: str | Path) -> dict:
    """The store summary `saekit info` prints (re-exported so the CLI needs only this module)."""
    return store_summary(path)
