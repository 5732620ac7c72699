"""The settings every in-model run (e2e, finetune) shares: where it runs and how often it logs and checkpoints.

Nested as `run` in `E2EConfig` and `FinetuneConfig` (flags --checkpoint-every, --log-every,
--device, --resume as before).  None of them changes what a run computes, so none is part
of a checkpoint's identity: a run may resume on another device or log more often.
"""

from __future__ import annotations

from dataclasses import dataclass

from saekit.config import check_fields


@dataclass
class LoopConfig:
    """How an in-model run steps through `saekit.engine`: checkpoint and log cadence, device, resume."""

    checkpoint_every: int = 100
    """Steps between checkpoints (0: only at the end)."""
    log_every: int = 10
    """Steps between progress updates and metrics.jsonl lines."""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... or auto (cuda when available)."""
    resume: bool = False
    """Continue from the last good checkpoint (exactly the batches an uninterrupted run would see)."""

    def __post_init__(self):
        check_fields(self)  # log_every positive, checkpoint_every not negative
