"""`saekit harvest`: run a frozen model over text and store chosen hooks' activations.

    text files ──(saekit.text)──► token sequences ──(one forward, stopped early)──► StoreWriter ──► store

The forward pass happens here, in the caller's thread; converting, checking and writing
happen in the store's writer thread, so disk work overlaps the next forward.  Batches
never straddle shard boundaries: the shard a resumed run rewrites is made of exactly the
batches an uninterrupted run would have used, so its activations are bit-identical (a
BLAS call with a different batch shape may round differently).

Under torchrun (saekit.distributed) shard i is harvested by rank i mod world_size: every
rank reads and tokenises the whole text stream (cheap next to the forward) and runs the
model only on the sequences of its own shards, writing them under their global names.
Rank 0 folds the ranks' progress files into the manifest after a barrier, so the store is
file for file the one a single process would have written (same shards, same
sequences; activations equal up to the device's rounding), and a killed run resumes with
any number of ranks: each fills the missing shards it owns.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saekit import distributed, models, outdir, text
from saekit.config import check_fields, to_dict
from saekit.errors import SaekitError
from saekit.prefetch import can_overlap, prefetch
from saekit.progress import Progress
from saekit.tokens import PAD, model_input
from saekit.store import DTYPES, StoreWriter, check_existing, consolidate, progress_name, shard_index
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
    device: str = "auto"
    """Device for the forward pass: cpu, cuda, cuda:1, ... or auto (cuda when available)."""
    model_dtype: str = "auto"
    """dtype of the forward pass: auto (the model's own, e.g. bfloat16, on CUDA; float32 elsewhere), float32, bfloat16 or float16."""
    out: str = ""
    """Output directory of the activation store (created; rerun the same command to resume)."""
    seed: int = 0
    """Seeds torch before the forward (harvest order is fixed by the data; this only matters for a stochastic model)."""
    compat: bool = False
    """Apply TransformerLens weight processing (folded LayerNorm etc.) instead of the raw Hugging Face weights."""
    holdout: float = 0.05
    """Fraction of sequences (the last ones) the store's readers treat as the eval split."""

    def __post_init__(self):
        check_fields(self)
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
        if self.model_dtype not in models.MODEL_DTYPES:
            raise ValueError(f"model_dtype {self.model_dtype!r} is not one of {', '.join(models.MODEL_DTYPES)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout} must be in [0, 1)")

    @property
    def shard_seqs(self) -> int:
        return max(1, self.shard_tokens // self.context_size)

    @property
    def max_sequences(self) -> int | None:
        return math.ceil(self.tokens / self.context_size) if self.tokens else None


def config_identity(cfg: HarvestConfig, model_fingerprint: str, data_fp: list, forward: torch.dtype = torch.float32) -> tuple[dict, str]:
    """(config dict, hash) that decide whether an existing store may be resumed.

    `out` is left out so a store can be moved; the model and data fingerprints are in,
    so a changed model or corpus is not silently continued.  The forward's dtype is in as
    resolved (`forward`), and only when it is not float32, so stores harvested before the
    option existed keep their identity.
    """
    d = to_dict(cfg)
    d.pop("out")
    d.pop("model_dtype", None)
    if forward != torch.float32:
        d["model_dtype"] = str(forward).removeprefix("torch.")
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


def harvest(cfg: HarvestConfig, progress: bool = True, model: models.LoadedModel | None = None) -> Path:
    """Harvest `cfg.hooks` of `cfg.model` over `cfg.data` into the store `cfg.out`; returns its path.

    Resumes a store left by a killed run with the same config; refuses one with a
    different config before touching it.  `model` reuses an already loaded model (it must
    be the one `cfg.model` names; benchmarks and pipelines pass it to skip loading).
    Started by torchrun (WORLD_SIZE > 1), the ranks share the work shard by shard.
    """
    if not cfg.out:
        raise SaekitError("no output directory; pass --out DIR")
    if not cfg.hooks:
        raise SaekitError("no hooks given; pass --hooks blocks.0.hook_resid_post (comma-separated for several)")
    from saekit.toy.corpus import check_packing

    # a toy corpus harvested out of line with its labels: `toy eval` could only refuse the store afterwards
    check_packing(cfg.data, cfg.packing, cfg.context_size, "pass --packing doc --context-size {n}")
    dist_env = distributed.env()
    # Under torchrun `cuda` means this rank's GPU (cuda:LOCAL_RANK); alone, the device is used as given.
    device = str(distributed.device(cfg.device, dist_env)) if dist_env.distributed else str(models.resolve_device(cfg.device))
    with distributed.session(device) as dist_env, outdir.claim(cfg.out, "harvest", rank=dist_env.rank):
        return _harvest(cfg, progress, model, dist_env, device)


def _harvest(cfg: HarvestConfig, progress: bool, model: models.LoadedModel | None, dist_env: distributed.DistEnv, device: str) -> Path:
    rank, world = dist_env.rank, dist_env.world_size
    out = Path(cfg.out)
    files = text.data_files(cfg.data)
    model_path = models.resolve_model_path(cfg.model)
    forward = next(model.bridge.parameters()).dtype if model else models.forward_dtype(model_path, device, cfg.model_dtype)
    config, config_hash = config_identity(cfg, models.fingerprint(model_path), text.data_fingerprint(files), forward)
    # Every rank checks before any rank writes: a refused config is refused everywhere.
    err = None
    try:
        resume = check_existing(out, config, config_hash)
    except SaekitError as e:
        err, resume = str(e), None
    distributed.agree(err)
    if resume and resume.get("complete"):
        return out

    lm = model or models.load_model(cfg.model, compat=cfg.compat, device=device, dtype=forward)
    info = lm.info
    if cfg.context_size > info.n_ctx:
        raise SaekitError(f"context_size {cfg.context_size} is larger than the model's context ({info.n_ctx}); pass --context-size {info.n_ctx} or less")
    specs = models.resolve_hooks(lm, cfg.hooks)
    bos = lm.bos_id
    eos = lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else bos
    # Tokenising ahead and writing run in background threads, on CPU only where torch leaves a core free.
    overlap = can_overlap(next(lm.bridge.parameters()).device)
    seqs = prefetch(
        text.sequences(cfg.data, lm.tokenizer, cfg.context_size, bos_id=bos, eos_id=eos, packing=cfg.packing, text_field=cfg.text_field),
        size=4 * cfg.batch_size,
        name="saekit-tokenize",
        background=overlap,
    )
    first = next(seqs, None)
    if first is None:
        raise SaekitError(f"no text in {cfg.data}: every document is empty; add documents (or fix --text-field)")
    seqs = itertools.chain([first], seqs)

    header = {
        "model": info.to_dict(),
        "bos_id": bos,
        "rows": {"exclude_bos": True, "pad_token": PAD},
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
    kw = dict(header=header, hooks=specs, context_size=cfg.context_size, dtype=cfg.dtype, shard_seqs=cfg.shard_seqs, resume=resume,
              background=overlap)
    if dist_env.distributed:
        # Rank 0 alone writes the manifest (finished shards so far) and removes leftovers, before anyone writes.
        if dist_env.is_main:
            StoreWriter(out, **kw).abort()
        distributed.barrier()
        writer = StoreWriter(out, **kw, progress_file=progress_name(rank), clean=False)
    else:
        writer = StoreWriter(out, **kw)
    done = {shard_index(s["file"]): int(s["n_seq"]) for s in writer.manifest["shards"]}

    def mine(shard: int) -> bool:
        return shard % world == rank and shard not in done

    device = next(lm.bridge.parameters()).device
    names = [s.name for s in specs]
    torch.manual_seed(cfg.seed)
    stop = cfg.max_sequences
    total = _rank_tokens(stop, cfg.shard_seqs, rank, world) * cfg.context_size if stop else None
    show = progress and dist_env.is_main
    bar = Progress(enabled=show, unit="tokens")
    bar.add("harvest", total, sum(n for i, n in done.items() if i % world == rank) * cfg.context_size)
    ok = False
    n_seen = 0
    try:
        for i, toks in _batches(seqs, 0, stop, cfg.batch_size, cfg.shard_seqs):
            n_seen = i + len(toks)
            if not mine(i // cfg.shard_seqs):
                continue  # another rank's shard, or one already finished: tokenised only to keep count
            inp = torch.from_numpy(model_input(toks, bos)).long().to(device)  # PAD never reaches the model
            acts = capture(lm.bridge, inp, names)
            writer.write(toks, acts, start=i)
            bar.update(advance=toks.size)
        # A finished shard the text no longer fills (the corpus shrank without changing its fingerprint).
        short = [i for i, n in done.items() if i * cfg.shard_seqs + n > n_seen]
        if short:
            raise SaekitError(f"{out} already holds shard {short[0]} but {cfg.data} now yields only {n_seen} sequences; choose another --out")
        writer.close()
        ok = True
    finally:
        if not ok:
            writer.abort()
        bar.close()
    if dist_env.distributed:
        distributed.barrier()  # every rank's shards are on disk and listed in its progress file
        err = None
        if dist_env.is_main:
            try:
                consolidate(out, complete=True)
            except SaekitError as e:
                err = str(e)
        distributed.agree(err)  # the manifest is complete before any rank returns
    return out


def _rank_tokens(n_seq: int, shard_seqs: int, rank: int, world: int) -> int:
    """Sequences of the first `n_seq` that fall in shards owned by `rank` (shard i belongs to rank i mod world)."""
    n_shards = math.ceil(n_seq / shard_seqs)
    return sum(min(shard_seqs, n_seq - i * shard_seqs) for i in range(rank, n_shards, world))


def describe(path: str | Path) -> dict:
    """The store summary `saekit info` prints (re-exported so the CLI needs only this module)."""
    return store_summary(path)
