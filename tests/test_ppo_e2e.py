"""End to end: PPO with a critic (algo=ppo, advantage=gae) in `rlloop.train` on the tiny model — the
critic is its own DeepSpeed learner group, initialised from a PRM folder (the PRM as critic), trained
toward the GAE returns of the PRM's step rewards + the outcome while the policy updates, checkpointed
with the run and resumed from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from tests.conftest import FIXTURES, LENGTH_REWARD, TINY_RUN, run_cli

ENV = {"PYTHONPATH": FIXTURES}


def _train_rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/total" in r]


@pytest.mark.slow
def test_ppo_with_a_prm_initialised_critic_trains_saves_and_resumes(tmp_path):
    from rlloop.models import resolve_model
    from rlloop.rewards.prm.model import HEAD_FILE, ValueHeadModel
    from rlloop.train import compose_config

    # a PRM folder on the tiny policy's backbone with a non-zero head: the critic starts from it
    cfg = compose_config(["model=tiny"])
    policy = resolve_model(cfg.model, cfg.task)  # the run's policy: the critic init shares its tokenizer
    torch.manual_seed(0)
    prm = ValueHeadModel.from_backbone(policy)
    torch.nn.init.normal_(prm.head.weight, std=0.2)
    prm.save_pretrained(str(tmp_path / "prm"))
    AutoTokenizer.from_pretrained(policy).save_pretrained(str(tmp_path / "prm"))  # as prm_train writes it

    run = [
        *TINY_RUN,
        *LENGTH_REWARD,
        "algo=ppo",
        # the PRM twice: dense step rewards (shaping, scored by the PRM service) and the critic's start
        "reward=tdrm",
        "reward.fusion=step",
        "reward.w_prm=0.5",
        "algo.critic.init=prm",
        f"reward.prm.path={tmp_path / 'prm'}",
        "algo.critic.lr=1e-3",
        "learner.world_size=1",
        "trainer.eval_before=false",
    ]
    out = tmp_path / "run"
    proc = run_cli([*run, "trainer.total_steps=3", "trainer.save_every=2", f"hydra.run.dir={out}"], env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "critic: prm init from" in proc.stdout + proc.stderr
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["critic/version"] for r in rows] == [1.0, 2.0, 3.0]  # one value step per RL step
    for r in rows:
        assert np.isfinite(r["critic/vf_loss"]) and r["critic/vf_loss"] > 0
        assert 0 < r["critic/values"] < 1  # a PRM-initialised critic: V = sigmoid(head), success probability
        assert "critic/explained_var" in r and r["time/critic_values"] > 0
        assert r["fusion/prm_shaping_sum/std"] > 0  # step rewards from the PRM reached the token rewards
    assert "mem/critic_rss_gb" in rows[-1]

    # the trained critic: a PRM folder whose head moved away from the initial PRM's
    summary = json.loads((out / "summary.json").read_text())
    assert summary["critic_checkpoint"] == str(out / "critic")
    init_head = load_file(str(tmp_path / "prm" / HEAD_FILE))["weight"]
    trained_head = load_file(str(out / "critic" / HEAD_FILE))["weight"]
    assert not torch.allclose(init_head, trained_head)
    ValueHeadModel.from_pretrained(str(out / "critic"))
    assert (out / "checkpoints" / "step_000002" / "critic").is_dir()

    # resume from step 2: the critic continues from its checkpointed state (version 2 -> 3 -> 4)
    again = tmp_path / "resumed"
    step2 = out / "checkpoints" / "step_000002"
    proc = run_cli(
        [
            *run,
            "trainer.total_steps=4",
            f"trainer.resume={step2}",
            "trainer.save_final=false",
            f"hydra.run.dir={again}",
        ],
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = _train_rows(again)
    assert [r["step"] for r in rows] == [3, 4]
    assert [r["critic/version"] for r in rows] == [3.0, 4.0]


@pytest.mark.slow
def test_ppo_with_qrm_token_rewards_and_a_qrm_initialised_critic(tmp_path):
    """Q-RM twice, as issue 6 asks: its per-token rewards (token fusion, std-normalised) go through GAE,
    and the critic starts from the Q-RM's backbone and token head (linear V)."""
    from rlloop.models import resolve_model
    from rlloop.rewards.qrm.model import TokenQModel
    from rlloop.train import compose_config

    cfg = compose_config(["model=tiny"])
    policy = resolve_model(cfg.model, cfg.task)  # the run's policy: the critic init shares its tokenizer
    torch.manual_seed(0)
    TokenQModel.from_backbone(policy).save_pretrained(str(tmp_path / "qrm"))
    AutoTokenizer.from_pretrained(policy).save_pretrained(str(tmp_path / "qrm"))
    out = tmp_path / "run"
    proc = run_cli(
        [
            *TINY_RUN,
            *LENGTH_REWARD,
            "algo=ppo",
            "reward=qrm",
            f"reward.qrm.path={tmp_path / 'qrm'}",
            "algo.critic.init=qrm",
            "learner.world_size=1",
            "trainer.eval_before=false",
            "trainer.total_steps=2",
            f"hydra.run.dir={out}",
        ],
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "critic: qrm init from" in proc.stdout + proc.stderr and "linear output" in proc.stdout + proc.stderr
    rows = _train_rows(out)
    assert [r["critic/version"] for r in rows] == [1.0, 2.0]
    for r in rows:
        assert r["qrm/token_std"] > 0 and np.isfinite(r["critic/vf_loss"])
        assert r["critic/values"] != 0  # the Q-RM head, not a zero head
