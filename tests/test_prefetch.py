"""saekit.prefetch: order, errors and shutdown of the background iterator."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from saekit.prefetch import prefetch


def test_prefetch_keeps_order_and_runs_ahead():
    produced = []

    def items():
        for i in range(20):
            produced.append(i)
            yield i

    it = prefetch(items(), size=3)
    assert next(it) == 0
    deadline = time.time() + 5
    while len(produced) < 4 and time.time() < deadline:  # the thread fills the queue while we hold item 0
        time.sleep(0.01)
    assert len(produced) >= 4
    assert [0, *it] == list(range(20))


def test_prefetch_reraises_the_producers_error_in_the_consumer():
    def items():
        yield 1
        raise ValueError("bad shard")

    it = prefetch(items())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad shard"):
        next(it)


def test_closing_the_consumer_stops_the_thread():
    it = prefetch(itertools.count(), size=2, name="saekit-test-prefetch")
    assert next(it) == 0
    it.close()
    deadline = time.time() + 5
    while any(t.name == "saekit-test-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "saekit-test-prefetch" for t in threading.enumerate())


def test_close_returns_after_the_producer_has_stopped():
    """Closing waits for the producer, so nothing of ours runs on after it (or at exit), even with a full queue."""
    it = prefetch(itertools.count(), size=2, name="saekit-test-join")
    assert next(it) == 0
    time.sleep(0.05)  # the producer fills the queue and blocks in put
    it.close()
    assert not any(th.name == "saekit-test-join" for th in threading.enumerate())


def test_inline_prefetch_runs_in_the_consumers_thread():
    """background=False (no free core): same items, produced on demand by the caller's thread."""
    threads = []

    def items():
        for i in range(5):
            threads.append(threading.current_thread())
            yield i

    it = prefetch(items(), background=False)
    assert next(it) == 0 and len(threads) == 1  # nothing produced ahead
    assert [0, *it] == list(range(5))
    assert set(threads) == {threading.current_thread()}


def test_can_overlap_follows_torch_threads(monkeypatch):
    import os

    import torch

    from saekit.prefetch import can_overlap

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not can_overlap("cpu")
    assert can_overlap("cuda")  # the producer's core is not the device's
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert can_overlap("cpu")
