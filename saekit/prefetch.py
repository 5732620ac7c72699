"""Run an iterator one step ahead in a background thread, so producing the next item overlaps using this one.

Used where the producer is I/O or Python work and the consumer is torch compute that releases
the GIL: harvest tokenises the next batch during the forward pass, and the Trainer reads,
casts and scales the next batch of any source during the step.  Order is kept (one producer), an exception in
the producer is re-raised at the consumer's next item, and closing the consumer (or dropping
it) stops the thread.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


def can_overlap(device: torch.device | str = "cpu") -> bool:
    """Whether a producer thread can run beside torch's work on `device` without taking a core from it.

    Always off CPU.  On CPU only where torch's intra-op threads leave one of this process's
    CPUs free: otherwise a producer steals a core from every parallel op, and each op waits for
    its slowest thread.  The Trainer's ReLU step on the toy store (2 cores, 2 torch threads)
    took 15.3 ms with the batch prepared in the background against 12.3 ms inline, while on 1
    torch thread the background was the faster (18.7 against 20.6 ms; benchmarks/README.md).
    """
    if torch.device(device).type != "cpu":
        return True
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return torch.get_num_threads() < cpus


def prefetch(items: Iterable[T], size: int = 2, name: str = "saekit-prefetch", background: bool = True) -> Iterator[T]:
    """Yield `items` in order while a daemon thread keeps up to `size` of them ready (inline if not `background`)."""
    if not background:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for x in items:
                if stop.is_set() or not put(x):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        # Stop the producer and wait for it, so no thread of ours still runs torch or h5py code when the
        # consumer moves on or the process exits: emptying the queue frees a blocked put at once, and the
        # producer then sees `stop` before making another item.
        stop.set()
        while True:
            try:
                q.get_nowait()
            except queue.Empty:
                break
        thread.join(timeout=60)
