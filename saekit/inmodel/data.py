"""Token sequences for in-model training: text or a store's splits, held-out rows, and the batch of any step.

Batches are a pure function of (seed, step) (`batch_at`), so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from saekit.errors import SaekitError


class TokenData(NamedTuple):
    train: np.ndarray
    """int32 (n_train, T), PAD = -1."""
    eval: np.ndarray
    """int32 (n_eval, T): held out, never trained on."""
    source: str




def load_tokens(data: str, store: str, tokenizer, bos_id: int, seq_len: int, n_train: int, n_eval: int,
                text_field: str = "text", n_ctx: int | None = None, packing: str = "concat",
                fix: str = "pass --packing doc --seq-len {n}") -> TokenData:
    """Training and held-out sequences from text (first n_eval sequences held out) or a store's splits.

    At most n_train training sequences are read: a longer corpus is not needed for the
    steps asked, a shorter one is cycled through in epochs.
    """
    if store:
        from saekit.store import open_store

        st = open_store(store)
        tr, ev = st.split("train"), st.split("eval")
        if len(tr) == 0:
            raise SaekitError(f"store {store} has no training sequences")
        if len(ev) == 0:
            raise SaekitError(f"store {store} has no eval split; harvest it with --holdout > 0 or pass --data")
        train = np.asarray(st.read_tokens(tr.start, min(tr.stop, tr.start + n_train)), dtype=np.int32)
        evals = np.asarray(st.read_tokens(ev.start, min(ev.stop, ev.start + n_eval)), dtype=np.int32)
        if n_ctx is not None and train.shape[1] > n_ctx:
            raise SaekitError(f"store {store} has sequences of {train.shape[1]} tokens, longer than the model's context {n_ctx}")
        return TokenData(train, evals, f"store:{store}")
    if not data:
        raise SaekitError("no training data; pass --data FILE (text) or --store DIR")
    if n_ctx is not None and seq_len > n_ctx:
        raise SaekitError(f"--seq-len {seq_len} is longer than the model's context ({n_ctx}); lower it")
    from saekit.text import sequences
    from saekit.toy.corpus import check_packing

    check_packing(data, packing, seq_len, fix)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos_id
    seqs = sequences(data, tokenizer, seq_len, bos_id=bos_id, eos_id=eos, packing=packing, text_field=text_field)
    got = []
    for s in seqs:
        got.append(s)
        if len(got) >= n_eval + n_train:
            break
    if len(got) <= n_eval:
        raise SaekitError(f"{data} gives only {len(got)} sequences of {seq_len} tokens, all needed for the {n_eval} held-out ones; "
                          "add text, lower --eval-sequences or --seq-len")
    arr = np.stack(got).astype(np.int32)
    return TokenData(arr[n_eval:], arr[:n_eval], f"data:{data}")


def batch_at(train: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The sequences of step `step`: epochs of seeded permutations, so any step can be recomputed (resume)."""
    n = train.shape[0]
    idx = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(j, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        idx.append(perm[pos])
    return train[np.asarray(idx)]
