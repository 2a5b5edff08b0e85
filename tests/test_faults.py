"""Fault injection: actors SIGKILLed mid-step are restarted, re-synced, and their work re-issued once."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from hydra import compose, initialize_config_dir

from rlloop.config import register_configs
from rlloop.controller import PromptStream, Trainer
from tests.conftest import FIXTURES, LENGTH_REWARD, ROOT, TINY_RUN

register_configs()


def _trainer(tmp_path, *extra):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=[
                *TINY_RUN,
                *LENGTH_REWARD,
                "learner.world_size=1",
                "trainer.call_timeout_s=120",
                *extra,
            ],
        )
    return Trainer(cfg, tmp_path)


def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def _kill_during(trainer: Trainer, method: str, actor_getter, delay: float = 0.05) -> threading.Thread:
    """SIGKILL the actor's process `delay` s after the controller next enters `method`."""
    entered = threading.Event()
    original = getattr(trainer, method)

    def wrapped(*args, **kwargs):
        entered.set()
        return original(*args, **kwargs)

    setattr(trainer, method, wrapped)
    pid = _pid(actor_getter())

    def killer():
        entered.wait(timeout=300)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_rollout_worker_and_prm_killed_mid_step(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(FIXTURES)
    trainer = _trainer(tmp_path, "rollout.max_new_tokens=48", "reward=tdrm")
    try:
        rows = [trainer.train_step()]
        _kill_during(trainer, "generate", lambda: trainer.workers[0])
        rows.append(trainer.train_step())
        assert trainer.restarts.get("rollout worker 0") == 1
        _kill_during(trainer, "verify", lambda: trainer.prm)
        rows.append(trainer.train_step())
        assert trainer.restarts.get("PRM service") == 1
        rows.append(trainer.train_step())
        # The restarted worker was re-synced: step 4 samples with the weights after update 3.
        assert rows[-1]["rollout/policy_version"] == 3
        assert all("reward/total" in r and r["time/step"] > 0 for r in rows)
        k = trainer.cfg.rollout.prompts_per_step
        planned = [s.uid for s in PromptStream(trainer.train_set, trainer.cfg.trainer.seed).take(4 * k)]
        assert trainer.trained_groups == planned  # nothing lost, nothing trained twice, same order
    finally:
        trainer.shutdown()
