"""Shared test helpers: run rlloop entry points in a subprocess with a clean, CI-like environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlloop.distributed.env import without_dist_env

ROOT = Path(__file__).resolve().parents[1]

# Small, fast settings for end-to-end runs on the tiny model (2 cores).
TINY_RUN = [
    "model=tiny",
    # the end-to-end tests were written against the old defaults (arith, the PRM service on, two ZeRO-2
    # ranks, the reference pass); the embedded demo's defaults changed for speed (issue 20), the tests not
    "task=arith",
    "reward=tdrm",
    "learner=zero2",
    "algo.use_ref=true",
    "rollout.num_workers=1",  # one process less per e2e test (the default runs two)
    "rollout.prompts_per_step=4",
    "rollout.n=4",
    "rollout.max_new_tokens=24",
    "task.num_test=8",
    "trainer.eval_every=0",
    "reward.verifier.num_workers=1",
    "learner.micro_batch_size=4",
    "learner.lr=1e-3",
    "logger=[console,jsonl]",
]


# A random tiny model never answers right, so every GRPO advantage would be 0 and nothing could change.
# A TRL-style length reward from the verifier fixtures (wired by config alone) gives a real signal.
FIXTURES = str(ROOT / "tests" / "rewards" / "verifiers")
LENGTH_REWARD = [
    "reward.verifier.sources={arith:custom}",
    "reward.verifier.custom_fn=reward_fixtures:trl_len_reward",
]


def run_cli(args: list[str], *, timeout: float = 600, env: dict | None = None, module: str = "rlloop.train"):
    """Run `python -m <module> <args>` from the repo root; returns CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    full_env = without_dist_env(full_env)  # the CLI is its own group of one, whatever a test left behind
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
