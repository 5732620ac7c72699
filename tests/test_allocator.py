"""The allocator setting in-model training applies on glibc Linux and leaves allocation working."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from saekit import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_large_blocks_applies_and_large_tensors_still_allocate():
    assert allocator.keep_large_blocks()
    assert allocator.keep_large_blocks()  # idempotent
    big = torch.ones(512 * 128, 128)  # exactly 32 MiB: the block size the setting is for
    assert float(big.sum()) == 512 * 128 * 128
