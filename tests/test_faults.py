"""Fault injection: actors SIGKILLed mid-step are restarted, re-synced, and their work re-issued once."""

from __future__ import annotations

import json
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
        # The PRM dies while the step generates, before its score call is sent. (Killed during verify, it
        # had often finished scoring 16 tiny trajectories in ~20 ms already: the death then surfaced only
        # at the next step, and this assertion flaked.)
        _kill_during(trainer, "generate", lambda: trainer.prm)
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


# ---- learner rank death: the run restarts itself from its last complete checkpoint ----------------------


class _FakeTrainer:
    """Stands in for controller.Trainer in rlloop.train.run: every attempt's run() raises `error`."""

    attempts: list = []
    error: Exception | None = None

    def __init__(self, cfg, out_dir) -> None:
        self.cfg, self.step = cfg, 0
        _FakeTrainer.attempts.append(cfg.trainer.resume)

    def run(self) -> dict:
        self.step = 2
        if _FakeTrainer.error is not None:
            raise _FakeTrainer.error
        return {}

    def shutdown(self) -> None:
        pass


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=[*TINY_RUN, *overrides])


def test_a_failed_start_releases_its_placement_groups_and_actors(tmp_path, monkeypatch):
    """An actor that fails after the placement groups exist (here the learner group) must not leave them
    reserved: on a long-lived cluster the next job would wait for those CPUs forever."""
    import ray
    from ray.util import placement_group_table

    from rlloop.learner import group

    def broken(self, *args, **kwargs):
        raise group.LearnerError("learner setup failed (injected)")

    monkeypatch.setattr(group.LearnerGroup, "__init__", broken)
    monkeypatch.syspath_prepend(FIXTURES)
    with pytest.raises(group.LearnerError, match="injected"):
        _trainer(tmp_path, "trainer.eval_before=false")
    assert ray.is_initialized()
    live = {k: v["name"] for k, v in placement_group_table().items() if v["state"] != "REMOVED"}
    assert live == {}, live
    # every CPU is free again: no actor (rollout workers, PRM, verifiers) holds one (ray.kill is asynchronous)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] - 1e-6:
        assert time.monotonic() < deadline, (ray.available_resources(), ray.cluster_resources())
        time.sleep(0.5)


@pytest.mark.parametrize("lost, max_restarts, attempts", [(True, 2, 3), (True, 0, 1), (False, 2, 1)])
def test_restart_bound_and_only_for_a_lost_learner(tmp_path, monkeypatch, lost, max_restarts, attempts):
    """A dead/hung rank restarts the run at most trainer.max_restarts times; a rank that raised (every
    rank alive: a bug or bad batch, which a restart would repeat) fails at once."""
    from rlloop import controller
    from rlloop import train as train_cli
    from rlloop.learner.group import LearnerError

    monkeypatch.setattr(controller, "Trainer", _FakeTrainer)
    monkeypatch.setattr(_FakeTrainer, "attempts", [])
    monkeypatch.setattr(
        _FakeTrainer, "error", LearnerError("learner rank 1 died running 'train_step'", lost=lost)
    )
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward/total": 0.1}\n')
    with pytest.raises(LearnerError, match="rank 1 died"):
        train_cli.run(_compose(f"trainer.max_restarts={max_restarts}"), str(tmp_path))
    assert len(_FakeTrainer.attempts) == attempts
    # No checkpoint was written: restarts start from scratch, and the failed attempt's rows are dropped.
    assert _FakeTrainer.attempts == [None] * attempts
    if attempts > 1:
        assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_restart_resumes_from_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    from rlloop import checkpoint, controller
    from rlloop import train as train_cli
    from rlloop.learner.group import LearnerError

    tmp = checkpoint.begin(tmp_path / "checkpoints", 2)
    (tmp / "state.json").write_text(json.dumps({"step": 2}))
    os.rename(tmp, checkpoint.step_dir(tmp_path / "checkpoints", 2))
    monkeypatch.setattr(controller, "Trainer", _FakeTrainer)
    monkeypatch.setattr(_FakeTrainer, "attempts", [])
    monkeypatch.setattr(
        _FakeTrainer, "error", LearnerError("learner rank 0 running 'train_step': no answer", lost=True)
    )
    with pytest.raises(LearnerError):
        train_cli.run(_compose("trainer.max_restarts=1"), str(tmp_path))
    assert _FakeTrainer.attempts == [None, "auto"]


@pytest.mark.slow
def test_learner_rank_killed_mid_run_restarts_from_checkpoint(tmp_path, monkeypatch):
    """SIGKILL learner rank 1 during step 3's update (checkpoints after steps 1 and 2): the run shuts its
    actors down, resumes from step 2 and finishes; every planned prompt is trained on exactly once, in
    order, and metrics.jsonl has steps 1, 2, 3 once each."""
    from rlloop import controller
    from rlloop import train as train_cli
    from rlloop.learner.group import LearnerGroup

    monkeypatch.syspath_prepend(FIXTURES)
    cfg = _compose(
        *LENGTH_REWARD,
        "reward=rule",
        "learner.world_size=2",
        "trainer.total_steps=3",
        "trainer.save_every=1",
        "trainer.eval_before=false",
        "trainer.call_timeout_s=120",
    )
    trainers: list[Trainer] = []

    class RecordingTrainer(Trainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

    original = LearnerGroup.train_step
    killed: list[float] = []

    def train_step(group, batch):
        if len(trainers) == 1 and trainers[0].step == 3 and not killed:
            pid = _pid(group.actors[1])
            killed.append(time.monotonic())
            threading.Timer(0.05, os.kill, (pid, signal.SIGKILL)).start()
        return original(group, batch)

    monkeypatch.setattr(controller, "Trainer", RecordingTrainer)
    monkeypatch.setattr(LearnerGroup, "train_step", train_step)
    summary = train_cli.run(cfg, str(tmp_path))

    assert killed and len(trainers) == 2
    [restart] = summary["restarts"]
    assert restart["step"] == 3 and restart["resumed_at_step"] == 2 and "rank" in restart["error"]
    assert restart["recover_s"] > 0
    k = cfg.rollout.prompts_per_step
    planned = [s.uid for s in PromptStream(trainers[-1].train_set, cfg.trainer.seed).take(3 * k)]
    assert trainers[-1].trained_groups == planned
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/total" in r] == [1, 2, 3]
    assert (tmp_path / "checkpoint" / "config.json").is_file()
