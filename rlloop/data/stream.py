"""The training prompts as an endless, seeded stream (one shuffle per epoch; its position is checkpointed)."""

from __future__ import annotations

import random

from rlloop.errors import RlloopError
from rlloop.types import Sample


class PromptStream:
    """Endless, seeded stream of training samples: a fresh shuffle each epoch, position kept for resume."""

    def __init__(self, samples: list[Sample], seed: int) -> None:
        if not samples:
            raise RlloopError("the training set is empty")
        self.samples = samples
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.samples)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[Sample]:
        out = []
        for _ in range(k):
            if self.pos == len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._shuffle()
            out.append(self.samples[self._order[self.pos]])
            self.pos += 1
        return out
