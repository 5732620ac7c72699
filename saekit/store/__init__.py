"""The activation store (format `saekit-activations` v1): writer, reader and shuffling loader.

A store is a directory (docs/architecture.md pins the layout):

    manifest.json       what was harvested, how, per-hook statistics, the finished shards
    shard-00000.h5      tokens int32 [n_seq, ctx] (-1 = padding), acts/<hook> [n_seq, ctx, width],
    shard-00001.h5      stats/<hook>/{count,sum,sumsq,norm_sum,sq_norm_sum} (float64, counted rows)
    ...

Read top-down:

- `format`: names, constants, the manifest (read, check against a resumed run,
  consolidate), per-hook running statistics, dtype conversion; shared by both sides.
- `writer`: `StoreWriter`, crash-safe shards written on a background thread.
- `reader`: `ActivationStore` and its shuffling, exactly resumable `BatchStream`;
  `summary` and `verify` for `saekit info`.
- `chunks`: where each sequence of a chunk lies in the file, and whole sequences read straight
  from it (h5py as the reference); `scatter`: the shuffle buffer's layout by batch and the copy
  that fills it; `staging`: the CUDA path's pinned ring (copy stream, cast on the device).

Every public name is re-exported here, so `from saekit.store import X` is the import to use.
"""

from saekit.store.format import (
    CHUNK_BYTES,
    DTYPES,
    FORMAT,
    MANIFEST,
    PROGRESS_PREFIX,
    STAT_KEYS,
    TMP_SUFFIX,
    VERSION,
    RunningStats,
    check_existing,
    consolidate,
    finished_shards,
    from_stored,
    gaps,
    has_tokens,
    progress_name,
    read_manifest,
    require_tokens,
    row_mask,
    sha256_file,
    shard_index,
    shard_name,
    to_stored,
    write_json_atomic,
)
from saekit.store.access import open_store, resolve_store_hooks, store_eval_batches
from saekit.store.reader import ActivationStore, BatchStream, summary, verify
from saekit.store.writer import StoreWriter

__all__ = [
    "CHUNK_BYTES", "DTYPES", "FORMAT", "MANIFEST", "PROGRESS_PREFIX", "STAT_KEYS", "TMP_SUFFIX", "VERSION",
    "ActivationStore", "BatchStream", "RunningStats", "StoreWriter",
    "check_existing", "consolidate", "finished_shards", "from_stored", "gaps", "has_tokens", "open_store", "progress_name", "read_manifest",
    "require_tokens", "resolve_store_hooks", "store_eval_batches",
    "row_mask", "sha256_file", "shard_index", "shard_name", "summary", "to_stored", "verify", "write_json_atomic",
]
