"""Using a store in a stage: open it with the checks every stage wants, pick its hooks, read its eval split."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from saekit.errors import SaekitError, did_you_mean
from saekit.store.reader import ActivationStore


def open_store(path: str) -> ActivationStore:
    """The store at `path`, refused (SaekitError) when missing, foreign, damaged or without training rows."""
    if not path:
        raise SaekitError("no store given; pass --store DIR (a folder written by `saekit harvest`)")
    store = ActivationStore(path)  # refuses missing, foreign or damaged stores with a SaekitError
    if not store.n_sequences or not store.n_rows:
        raise SaekitError(f"store {path} holds no training rows; harvest more text into it (`saekit harvest --out {path} ...`)")
    return store


def resolve_store_hooks(store: ActivationStore, names: list[str]) -> list[str]:
    """`names` checked against the store's hooks (`all`: every one), duplicates dropped."""
    present = list(store.hooks)
    if [n.lower() for n in names] == ["all"]:
        return present
    for n in names:
        if n not in present:
            raise SaekitError(f"hook {n!r} is not in store {store.path}{did_you_mean(n, present)}; "
                              f"hooks present: {', '.join(present)}")
    return list(dict.fromkeys(names))


def store_eval_batches(store: ActivationStore, hooks: list[str], rows_per_batch: int = 4096) -> Iterator[dict[str, Tensor]]:
    """Counted rows of the store's eval split, {hook: (n, width)} per chunk of sequences."""
    seqs = max(1, rows_per_batch // max(store.context_size, 1))
    for _, tokens, acts in store.iter_sequences(hooks, "eval", seqs):
        mask = torch.as_tensor(store.row_mask(tokens), dtype=torch.bool)
        yield {h: torch.as_tensor(acts[h])[mask] for h in hooks}
