"""Checkpoint and resume: a SIGKILLed run continues to the same parameters; writes are atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from rlloop import checkpoint
from rlloop.errors import RlloopError
from tests.conftest import FIXTURES, LENGTH_REWARD, ROOT, TINY_RUN, run_cli

RUN = [
    *TINY_RUN,
    *LENGTH_REWARD,
    "reward=rule",
    "trainer.total_steps=3",
    "trainer.save_every=1",
    "trainer.eval_before=false",
    "learner.world_size=2",
]
ENV = {"PYTHONPATH": FIXTURES}


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (Ray's too): a crash, not a shutdown."""
    parent = psutil.Process(proc.pid)
    procs = [parent, *parent.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(procs, timeout=30)


def _start(out, *extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", **ENV}
    return subprocess.Popen(
        [sys.executable, "-m", "rlloop.train", *RUN, *extra, f"hydra.run.dir={out}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    straight = tmp_path / "straight"
    proc = run_cli([*RUN, f"hydra.run.dir={straight}"], env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]

    crashed = tmp_path / "crashed"
    # every tracker that keeps state across a restart (wandb offline: no network, no key)
    trackers = ["logger=[console,jsonl,wandb,tensorboard]", "wandb.mode=offline"]
    driver = _start(crashed, *trackers)
    deadline = time.time() + 500
    # Kill it mid-training, right after the step-2 checkpoint is complete.
    while (
        not checkpoint.list_complete(crashed / "checkpoints")
        or checkpoint.list_complete(crashed / "checkpoints")[-1].name != "step_000002"
    ):
        assert driver.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    _kill_tree(driver)
    assert not (crashed / "checkpoint").exists()  # it really died before finishing

    proc = run_cli([*RUN, *trackers, "trainer.resume=auto", f"hydra.run.dir={crashed}"], env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the resumed attempt continues the killed attempt's wandb run (offline: one folder per attempt, same id)
    run_id = json.loads((crashed / "tracker_runs.json").read_text())["wandb"]
    attempts = sorted((crashed / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{run_id}") for a in attempts), attempts
    events = EventAccumulator(str(crashed / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/total")] == [1, 2, 3]  # the killed step 3 purged, no repeat
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_000002")
    a, b = _weights(straight / "checkpoint"), _weights(crashed / "checkpoint")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    rows = [json.loads(x) for x in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/total" in r] == [1, 2, 3]  # no gap, no duplicate

    # Nothing left to train: a loud error, not a silent no-op.
    again = run_cli(
        [*RUN, "trainer.total_steps=2", "trainer.resume=auto", f"hydra.run.dir={crashed}"], env=ENV
    )
    assert again.returncode != 0 and "nothing is left to train" in again.stdout + again.stderr

    # The exported checkpoint loads with plain transformers and equals the run's weights at that step.
    export = run_cli(
        [str(crashed / "checkpoints" / "step_000002"), str(tmp_path / "hf")], module="rlloop.export"
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert set(_weights(tmp_path / "hf")) == set(a)


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    driver = _start(out, "trainer.total_steps=6")
    root = out / "checkpoints"
    deadline = time.time() + 500
    # Wait for a complete checkpoint, then for the next write to start, and kill in the middle of it.
    while not (checkpoint.list_complete(root) and any(p.name.startswith(".tmp-") for p in root.iterdir())):
        assert driver.poll() is None and time.time() < deadline
        time.sleep(0.005)
    _kill_tree(driver)
    complete = checkpoint.list_complete(root)
    assert complete, "the previous checkpoint must survive"
    proc = run_cli([*RUN, "trainer.total_steps=6", "trainer.resume=auto", f"hydra.run.dir={out}"], env=ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == str(complete[-1])


def test_resume_refuses_another_model_and_an_empty_budget(tmp_path):
    ckpt = tmp_path / "step_000004"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"step": 4, "model_fingerprint": "abc"}))
    with pytest.raises(RlloopError, match="another model"):
        checkpoint.load_state(ckpt, fingerprint="def", total_steps=10)
    with pytest.raises(RlloopError, match="nothing is left to train"):
        checkpoint.load_state(ckpt, fingerprint="abc", total_steps=4)
    assert checkpoint.load_state(ckpt, fingerprint="abc", total_steps=5)["step"] == 4
    with pytest.raises(RlloopError, match="not a complete"):
        checkpoint.find(str(tmp_path / "nope"), tmp_path)
    (tmp_path / ".tmp-step_000005").mkdir()  # a half-written checkpoint is never picked
    assert checkpoint.find("auto", tmp_path) == ckpt
