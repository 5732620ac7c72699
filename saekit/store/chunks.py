"""Read whole sequences of a shard's datasets as plain bytes, straight into a caller's numpy buffer.

A store's datasets are chunked along sequences and written without filters, so the rows of
sequences [a, b) inside one chunk are one contiguous run of bytes in the file.  HDF5 tells
where each chunk starts (`get_chunk_info_by_coord`, asked once per chunk); after that a read
is one `os.preadv` per chunk touched, into memory the caller owns: no h5py call, no
temporary array, and the GIL is released for the copy, so several threads read in parallel
(h5py serialises every call behind one lock).  The training loader maps the file instead and
copies rows from the page cache by their offsets (`seq_offsets`, `scatter.copy_kept`).

A dataset that cannot be read that way (compressed or filtered, chunks that are not whole
sequences, a non-native byte order, a chunk never written) keeps a `None` map and is read
through h5py's `read_direct` into the same buffer: same bytes, slower.  `SAEKIT_READER=h5py`
(read once at import) forces that reference path everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

RAW = os.environ.get("SAEKIT_READER", "raw") != "h5py"


@dataclass(frozen=True)
class ChunkMap:
    """Where the chunks of one dataset `[n_seq, ...]` lie in its file: chunk j holds sequences [j·seqs, (j+1)·seqs)."""

    seqs: int
    """Sequences per chunk (the dataset's chunk length along axis 0)."""
    seq_bytes: int
    """Bytes of one sequence (all positions and values)."""
    offsets: np.ndarray
    """int64 [n_chunks]: each chunk's byte offset in the file."""


def chunk_map(ds: h5py.Dataset) -> ChunkMap | None:
    """The dataset's chunk offsets, or None when its bytes cannot be read raw (see the module docstring)."""
    if not RAW or ds.chunks is None or tuple(ds.chunks[1:]) != tuple(ds.shape[1:]) or not ds.dtype.isnative:
        return None
    if ds.id.get_create_plist().get_nfilters():
        return None
    seqs = int(ds.chunks[0])
    seq_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
    offsets = []
    for a in range(0, ds.shape[0], seqs):
        info = ds.id.get_chunk_info_by_coord((a,) + (0,) * (ds.ndim - 1))
        if info.byte_offset is None or info.size != seqs * seq_bytes:
            return None
        offsets.append(info.byte_offset)
    return ChunkMap(seqs, seq_bytes, np.asarray(offsets, np.int64))


def read_raw(fd: int, cmap: ChunkMap, a: int, b: int, out: np.ndarray) -> None:
    """Sequences [a, b) of a dataset into `out` (C-contiguous, (b - a) sequences of the dataset's dtype)."""
    dest = memoryview(out.reshape(-1).view(np.uint8))
    pos = 0
    for j in range(a // cmap.seqs, (b - 1) // cmap.seqs + 1):
        s0, s1 = max(a, j * cmap.seqs), min(b, (j + 1) * cmap.seqs)
        off = int(cmap.offsets[j]) + (s0 - j * cmap.seqs) * cmap.seq_bytes
        n = (s1 - s0) * cmap.seq_bytes
        while n:  # preadv may return short counts (signals, huge reads)
            got = os.preadv(fd, [dest[pos : pos + n]], off)
            if got <= 0:
                raise OSError(f"short read at byte {off} of a store shard (file truncated?)")
            pos, off, n = pos + got, off + got, n - got


def seq_offsets(cmap: ChunkMap, a: int, b: int) -> np.ndarray:
    """int64 byte offsets in the file of sequences a .. b - 1 of the dataset."""
    seqs = np.arange(a, b, dtype=np.int64)
    return cmap.offsets[seqs // cmap.seqs] + (seqs % cmap.seqs) * cmap.seq_bytes


def read_h5py(ds: h5py.Dataset, a: int, b: int, out: np.ndarray) -> None:
    """The reference path: sequences [a, b) through h5py, into `out`."""
    ds.read_direct(out, source_sel=np.s_[a:b], dest_sel=np.s_[0 : b - a])
