"""THE training loop: step, log, checkpoint, NaN stop, progress; what a step computes is an `Objective`.

Every trainer in saekit runs through `Engine.run`:

- reconstruction of stored activations (`saekit.train.Trainer`: several dictionaries, one
  read of the store, DDP under torchrun),
- KL of the frozen model with a dictionary spliced in (`saekit.inmodel.e2e`),
- next-token CE + commitment of a model with codebooks inside it (`saekit.inmodel.finetune`).

The engine owns the cadence (a log row every `log_every` steps and at the end, a
checkpoint every `checkpoint_every` steps and at the end), the metrics logs, the progress
display and the NaN stop; reading values back from the device happens only there, so an
objective's `step` never waits for the device.  Resume is the objective's `start()`
(it knows its checkpoints' contents; `saekit.runs` writes and reads them for all).
"""

from __future__ import annotations

import time
from pathlib import Path

from saekit.errors import SaekitError
from saekit.progress import Progress
from saekit.runs import MetricsLog, checkpoint_dir, checkpoint_steps


class Objective:
    """What one training step computes, for one or more runs trained on the same batches.

    A run is one model being trained (a dictionary of a sweep, a phase of a finetune); the
    engine shows one progress row and writes one metrics line per run and logging step.
    """

    labels: list[str]
    """One per run: how progress rows and errors name it."""
    unit: str = "steps"
    """What progress counts (tokens, steps)."""
    per_step: int = 1
    """Units per step (the batch's tokens for offline training)."""
    nan_advice: str = "lower --lr"
    """What to change when the loss becomes NaN/inf."""

    def take_step(self, step: int) -> None:
        """Step `step` (0-based) for every run: forward, backward, optimiser step; no device sync."""
        raise NotImplementedError

    def log_rows(self, step: int, seconds: float) -> list[dict]:
        """One metrics row per run for the steps since the last call (`seconds` since this run started)."""
        raise NotImplementedError

    def bad_steps(self) -> list[int | None]:
        """Per run, the first step whose loss was not finite (None: all finite so far)."""
        raise NotImplementedError

    def metrics_logs(self) -> list[MetricsLog | None]:
        """Per run, where its rows go (None: this process does not write, e.g. a DDP rank other than 0)."""
        raise NotImplementedError

    def checkpoint_roots(self) -> list[Path]:
        """Per run, the folder holding its `step-N/` checkpoints."""
        raise NotImplementedError

    def save_checkpoint(self, step: int) -> None:
        raise NotImplementedError

    def progress_info(self, row: dict) -> str:
        """The text after a run's progress bar."""
        return " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step" and isinstance(v, float))


class Engine:
    """Runs an objective from a step to `n_steps`, logging, checkpointing and stopping on NaN."""

    def __init__(self, objective: Objective, n_steps: int, log_every: int, checkpoint_every: int = 0, progress: bool = True):
        """`checkpoint_every` in steps (0: only at the end); `progress` False shows nothing."""
        self.obj = objective
        self.n_steps = n_steps
        self.log_every = max(1, log_every)
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.rate = float("nan")
        """Units per second over the steps run so far (updated at each log)."""

    def run(self, start: int) -> int:
        """Steps `start` .. n_steps - 1; returns the step reached."""
        obj = self.obj
        if start >= self.n_steps:
            return start
        bar = Progress(enabled=self.progress, unit=obj.unit)
        for label in obj.labels:
            bar.add(label, self.n_steps * obj.per_step, start * obj.per_step)
        t0, step = time.perf_counter(), start
        try:
            while step < self.n_steps:
                obj.take_step(step)
                step += 1
                last = step == self.n_steps
                if step % self.log_every == 0 or last:
                    seconds = time.perf_counter() - t0
                    self.rate = (step - start) * obj.per_step / seconds if seconds > 0 else float("nan")
                    self.check_finite()
                    rows = obj.log_rows(step, seconds)
                    for i, (log, row) in enumerate(zip(obj.metrics_logs(), rows)):
                        if log is not None:
                            log.append(row)
                        bar.update(i, done=step * obj.per_step, info=obj.progress_info(row))
                if last or (self.checkpoint_every and step % self.checkpoint_every == 0):
                    self.check_finite()
                    obj.save_checkpoint(step)
        finally:
            bar.close()
        return step

    def check_finite(self) -> None:
        """The NaN stop: name the run, the first bad step and the checkpoint kept (the last good one)."""
        for label, bad, root in zip(self.obj.labels, self.obj.bad_steps(), self.obj.checkpoint_roots()):
            if bad is None:
                continue
            done = checkpoint_steps(root)
            kept = f"last good checkpoint {checkpoint_dir(root, done[-1])} kept; " if done else "no checkpoint was written yet; "
            raise SaekitError(f"{label}: loss became NaN/inf at step {bad}; {kept}{self.obj.nan_advice} and rerun with --resume")
