"""The shuffle buffer's layout: where each row of a fill goes, and the copy that puts it there.

A fill of n rows is permuted (`perm`, seeded); batch b holds the rows perm[b·bs : (b+1)·bs].
Rather than gather each batch from random places of the buffer when it is served (a cache
miss per row, waited out one at a time: at width 256 that gather cost twice h5py's read of the
same bytes), the fill writes every row straight to its batch's part of the buffer: batch b is
then the contiguous rows [b·bs, (b+1)·bs), and serving it is a streaming copy or cast.  Within
a batch, rows keep their order in the fill (ascending), so the writes run as one sequential
stream per batch (whole lines, written with streaming stores).  A batch is the same set of rows as a random order
would give; only the order inside it is the fill's (a training step, which averages over its
batch, does not see it).  Rows left over (< bs) go after the last batch.

`slots` computes the layout; `copy_kept` copies a unit's counted rows from a byte array (a shard
mapped into memory, or a staging array) to their places in the buffer.  Both run as numba loops.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

BATCH_ORDER = 2
"""Version of the within-batch order, kept in training checkpoints.  1 (the loader before this module; a
checkpoint without the field): rows in the fill's permuted order; 2: the same rows per batch, in fill order."""


@numba.njit(nogil=True, cache=True)
def slots(perm: np.ndarray, batch_size: int) -> np.ndarray:
    """int64 [n]: for each row f of the fill, its place in the buffer (see the module docstring)."""
    n = perm.shape[0]
    n_batches = n // batch_size
    serve_pos = np.empty(n, np.int64)
    for q in range(n):
        serve_pos[perm[q]] = q
    filled = np.zeros(n_batches + 1, np.int64)  # rows placed so far per batch; the last: left-over rows
    out = np.empty(n, np.int64)
    for f in range(n):
        b = min(serve_pos[f] // batch_size, n_batches)
        out[f] = b * batch_size + filled[b]
        filled[b] += 1
    return out


@intrinsic
def _store_streaming(typingctx, arr, i, j, value):
    """arr[i, j] = value as a non-temporal store: the line goes to memory without being read first (a fill's rows are
    read again only when their batch is served, long after), which made the fill's copy about 20% faster."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1], args[2]], wraparound=False)
        store = builder.store(args[3], ptr)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.void(arr, i, j, value), codegen


@intrinsic
def _fence(typingctx):
    """A full memory fence: orders the streaming stores before anything the thread does next."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@numba.njit(nogil=True, cache=True)
def _copy_kept(src: np.ndarray, seq_starts: np.ndarray, keep: np.ndarray, dst: np.ndarray, dst_rows: np.ndarray) -> None:
    """The kept rows of each sequence (src[seq_starts[s]:], rows of dst.shape[1] elements) to dst's rows dst_rows,
    in order.  Any one integer dtype; offsets in its elements."""
    width = dst.shape[1]
    per_seq = keep.shape[0] // seq_starts.shape[0]
    k = 0
    for s in range(seq_starts.shape[0]):
        for t in range(per_seq):
            if keep[s * per_seq + t]:
                o = seq_starts[s] + t * width
                d = dst_rows[k]
                k += 1
                for j in range(width):
                    _store_streaming(dst, d, j, src[o + j])
    _fence()


def copy_kept(src: np.ndarray, seq_starts: np.ndarray, keep: np.ndarray, dst: np.ndarray, dst_rows: np.ndarray) -> None:
    """Copy the rows of n sequences where `keep` (bool [n · rows per sequence]) is set, in order, to rows
    `dst_rows` of `dst` ([rows, row bytes] uint8, C-contiguous).  `src` is uint8 and 1-D (a mapped shard file,
    or a staging array); sequence s starts at byte seq_starts[s].  Copied in the widest words (8, 4, 2 or 1
    bytes) that the row size and every offset allow: a byte loop ran at a third of the speed.  Releases the
    GIL, so the loader's threads copy in parallel."""
    row_bytes = dst.shape[1]
    if not len(seq_starts):
        return
    for word in (8, 4, 2, 1):
        if row_bytes % word == 0 and src.ctypes.data % word == 0 and dst.ctypes.data % word == 0 \
                and not (seq_starts % word).any():
            break
    dtype = np.dtype(f"u{word}")
    usable = len(src) - len(src) % word
    _copy_kept(src[:usable].view(dtype), seq_starts // word, keep, dst.view(dtype), dst_rows)
