"""glibc's allocator, set for long CPU training loops.

A training step allocates the same large tensors every step. glibc serves a block at or above
its mmap threshold (at most 32 MiB on 64-bit) with a fresh mmap and unmaps it when freed, and
trims the heap's top above 128 KiB, so every step faults the same pages in again. At the
TokFSM paper's batch (512 × 128 positions × 128 floats: exactly 32 MiB) that was a third of a
`saekit finetune` step (benchmarks/codebook_speed.py, batch 512: 5.0k → 7.9k tokens/CPU-s with
large blocks kept on the heap). The cost: the process keeps its peak heap until it exits,
which a training process reaches in its first steps anyway.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
"""mallopt's parameter numbers (glibc's malloc.h)."""
M_MMAP_MAX = -4

_applied = False


def keep_large_blocks() -> bool:
    """Serve every allocation from the heap and never give it back (glibc on Linux; elsewhere nothing).

    Returns whether the setting is in force. Safe to call more than once.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: leave it as it is
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    return _applied
