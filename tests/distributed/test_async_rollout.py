"""Off-policy pieces: lookahead per mode, staleness and stale groups, the producer pipeline's order."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rlloop.distributed.async_rollout import RolloutPipeline, lookahead, stale_groups, staleness


def test_lookahead_per_mode():
    assert lookahead("off", 3) == 0
    assert lookahead("one_step", 3) == 1
    assert lookahead("bounded", 3) == 3
    assert lookahead("bounded", 3, configured=5) == 5
    assert lookahead("bounded", 0, configured=1) == 1
    with pytest.raises(ValueError, match="async_mode='sometimes'"):
        lookahead("sometimes", 1)


def test_staleness_and_stale_groups():
    np.testing.assert_array_equal(staleness([3, 2, 0], 3), [0, 1, 3])
    groups = ["a", "a", "b", "b", "c", "c"]
    versions = [3, 1, 2, 2, 0, 0]  # group a has one old sample: the whole group goes
    assert stale_groups(groups, versions, 3, max_staleness=1) == ["a", "c"]
    assert stale_groups(groups, versions, 3, max_staleness=3) == []
    assert stale_groups(groups, versions, 3, max_staleness=0) == ["a", "b", "c"]


def test_pipeline_produces_ahead_in_step_order():
    started: list[int] = []
    threads: set[str] = set()

    def produce(step: int) -> int:
        started.append(step)
        threads.add(threading.current_thread().name)
        time.sleep(0.01)
        return step * 10

    pipe = RolloutPipeline(produce, lookahead=2)
    try:
        assert pipe.take(1) == 10  # nothing queued: produced on demand
        pipe.fill(2)
        assert pipe.queued_steps == [2, 3]
        assert pipe.drain() == [20, 30] and pipe.queued_steps == [2, 3]  # drained batches stay queued
        assert pipe.take(2) == 20
        pipe.fill(3)
        assert pipe.queued_steps == [3, 4]
        with pytest.raises(RuntimeError, match="queued batch is for step 3, asked for 4"):
            pipe.take(4)
        assert pipe.queued_steps == [3, 4] and pipe.drain() == [30, 40]
        assert started == [1, 2, 3, 4]
        assert all(name.startswith("rollout-ahead") for name in threads)
    finally:
        pipe.close()


def test_pipeline_raises_the_producer_error_at_take():
    def produce(step: int) -> int:
        if step == 2:
            raise KeyError(f"prompt of step {step}")
        return step

    pipe = RolloutPipeline(produce, lookahead=1)
    try:
        assert pipe.take(1) == 1
        pipe.fill(2)
        with pytest.raises(KeyError, match="prompt of step 2"):
            pipe.take(2)
    finally:
        pipe.close()
    with pytest.raises(ValueError, match="lookahead must be >= 1"):
        RolloutPipeline(produce, lookahead=0)
