"""Hypothesis strategies for the algos tests: ragged right-padded batches of groups.

Shapes and masks come from hypothesis draws (so it explores groups of one, empty rows, T = 1);
float contents come from a seeded RNG (cheap, and shrinking them rarely helps).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from hypothesis import strategies as st


@dataclass
class RaggedBatch:
    mask: list[list[int]]
    gids: list[int]
    rewards: list[list[float]]
    values: list[list[float]]
    rng: random.Random

    @property
    def B(self) -> int:
        return len(self.mask)

    @property
    def T(self) -> int:
        return len(self.mask[0])

    def t(self, x, dtype=torch.float64) -> torch.Tensor:
        return torch.tensor(x, dtype=dtype)


@st.composite
def ragged_batches(draw, max_groups: int = 4, max_group_size: int = 4, max_T: int = 8, holes: bool = False):
    sizes = draw(st.lists(st.integers(1, max_group_size), min_size=1, max_size=max_groups))
    T = draw(st.integers(1, max_T))
    rng = random.Random(draw(st.integers(0, 2**31 - 1)))
    labels = rng.sample(range(1000), len(sizes))
    gids = [labels[g] for g, n in enumerate(sizes) for _ in range(n)]
    if draw(st.booleans()):  # rows of one group need not be adjacent
        rng.shuffle(gids)
    mask = []
    for _ in gids:
        p = draw(st.integers(0, T))
        length = draw(st.integers(0, T - p))
        row = [0] * p + [1] * length + [0] * (T - p - length)
        if holes and length >= 3 and draw(st.booleans()):
            row[p + rng.randrange(1, length - 1)] = 0
        mask.append(row)
    kind = draw(st.sampled_from(["dense", "outcome", "equal"]))
    rewards = [[0.0] * T for _ in gids]
    for b, row in enumerate(mask):
        ts = [t for t, m in enumerate(row) if m]
        if kind == "dense":
            for t in range(T):  # padding gets junk too: it must be ignored
                rewards[b][t] = rng.gauss(0, 1)
        elif ts:
            rewards[b][ts[-1]] = 1.0 if kind == "equal" else float(rng.random() < 0.5)
    values = [[rng.uniform(-1, 1) for _ in range(T)] for _ in gids]
    return RaggedBatch(mask=mask, gids=gids, rewards=rewards, values=values, rng=rng)
