"""Asynchronous (off-policy) rollout: generation of later steps overlaps the learner's update.

`trainer.async_mode`:
- `off`: generate -> score -> update -> sync, one step at a time (on-policy).
- `one_step`: the batch of step k+1 is generated while the learner updates on step k, with the weights
  of version k-1 (one-step-off-policy, as verl's one_step_off_policy recipe): staleness 1.
- `bounded`: generation runs `trainer.async_lookahead` batches ahead (default: `max_staleness`).

Staleness of a sample = the learner's policy version when it trains on the sample minus the
`policy_version` the sample was generated with. A sample older than `trainer.max_staleness` is never
trained on: `stale_policy=drop` drops its group (the step trains on the rest, or on a fresh batch when
nothing is left), `wait` regenerates the stale groups' prompts with the current weights and waits for
them. With the default lookahead nothing goes stale; a lookahead above `max_staleness` buys throughput
with drops. The loss's importance correction uses the rollout logprobs (`algo.tis_cap`, required in
async modes): w_t = min(pi_old / pi_rollout, tis_cap) with pi_old the learner's current weights.

`RolloutPipeline` runs the producer (a callable step -> batch) in one background thread; batches are
produced in step order and taken in step order.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ASYNC_MODES = ("off", "one_step", "bounded")
STALE_POLICIES = ("drop", "wait")


def lookahead(mode: str, max_staleness: int, configured: int = 0) -> int:
    """Batches generated ahead of the learner: 0 (off), 1 (one_step), `configured` or `max_staleness`
    (bounded)."""
    if mode not in ASYNC_MODES:
        raise ValueError(f"trainer.async_mode={mode!r}: choose one of {ASYNC_MODES}")
    if mode == "off":
        return 0
    if mode == "one_step":
        return 1
    return int(configured) if configured > 0 else max(1, int(max_staleness))


def staleness(versions: Sequence[int], learner_version: int) -> np.ndarray:
    """learner_version - version per sample (int64 [N])."""
    return learner_version - np.asarray(versions, dtype=np.int64)


def stale_groups(
    groups: Sequence[str], versions: Sequence[int], learner_version: int, max_staleness: int
) -> list[str]:
    """Groups (prompt uids, in first-seen order) with any sample older than `max_staleness` versions.

    A group is judged whole: GRPO-style advantages compare a prompt's samples with each other.
    """
    old = staleness(versions, learner_version) > max_staleness
    return list(dict.fromkeys(g for g, o in zip(groups, old, strict=True) if o))


class RolloutPipeline:
    """Produces step batches ahead of the learner in one background thread.

    produce(step) builds the batch of training step `step` (generation, verification, PRM scoring);
    `take(step)` returns it (producing it now when it was not queued); `fill(step)` queues batches up to
    `lookahead` steps ahead starting at `step`. A producer error is raised by the `take` of its step.
    """

    def __init__(self, produce: Callable[[int], Any], lookahead: int) -> None:
        if lookahead < 1:
            raise ValueError(f"RolloutPipeline: lookahead must be >= 1, got {lookahead}")
        self.produce = produce
        self.lookahead = lookahead
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        self._queue: deque[tuple[int, Future]] = deque()

    def _submit(self, step: int) -> None:
        self._queue.append((step, self._executor.submit(self.produce, step)))

    def take(self, step: int) -> Any:
        if not self._queue:
            self._submit(step)
        queued = self._queue[0][0]
        if queued != step:
            raise RuntimeError(f"RolloutPipeline: next queued batch is for step {queued}, asked for {step}")
        return self._queue.popleft()[1].result()

    def fill(self, step: int) -> None:
        """Queue the batches of steps `step`, `step + 1`, ... until `lookahead` are queued."""
        nxt = self._queue[-1][0] + 1 if self._queue else step
        while len(self._queue) < self.lookahead:
            self._submit(nxt)
            nxt += 1

    def drain(self) -> list[Any]:
        """Wait until every queued batch is produced (they stay queued); returns them in step order."""
        return [future.result() for _, future in self._queue]

    @property
    def queued_steps(self) -> list[int]:
        return [step for step, _ in self._queue]

    def close(self) -> None:
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
