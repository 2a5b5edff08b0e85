"""Seconds per phase of one RL step (`time/<phase>`), and how much of a step is model compute."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class StepTimer:
    """Seconds per phase of one step, reported as `time/<phase>`."""

    def __post_init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


# Controller-side phases that block on model forward/backward passes in some actor (see step_overhead).
COMPUTE_PHASES = (
    "generate",
    "prm_wait",
    "token_rewards",
    "logprobs",
    "learner",
    "prm_update",
    "implicit_prm_update",
    "critic_values",
)
# Phase keys the timer holds that are not controller wall time: `prm` is the PRM replicas' own scoring
# seconds (summed over replicas, overlapping `generate`), `step` the whole step.
_NOT_PHASES = ("prm", "step")


def step_overhead(seconds: dict[str, float]) -> dict[str, float]:
    """`time/idle` and `time/overhead_frac` of one step from its StepTimer seconds (`step` included).

    idle: step time covered by no controller phase (batch building, bookkeeping).
    Model compute is the controller's wall time in COMPUTE_PHASES: generation (rollout workers), the
    wait on PRM scoring that generation did not hide (`prm_wait`; the replicas' own `prm` seconds overlap
    generation and would count twice), Q-RM / implicit-PRM token scoring, old/ref logprobs, the learner's
    update and the online PRMs' updates. The actors report no compute time of their own, so each phase
    includes its call and transfer costs. Everything else (verify, fusion, weight sync, idle) is framework
    overhead: overhead_frac = 1 - compute / step, clamped to [0, 1]. A step of 0 s gives 0.
    """
    step = seconds.get("step", 0.0)
    covered = sum(v for k, v in seconds.items() if k not in _NOT_PHASES)
    compute = sum(seconds.get(k, 0.0) for k in COMPUTE_PHASES)
    frac = min(1.0, max(0.0, 1.0 - compute / step)) if step > 0 else 0.0
    return {"time/idle": max(0.0, step - covered), "time/overhead_frac": frac}
