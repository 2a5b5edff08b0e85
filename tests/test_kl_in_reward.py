"""algo.kl_in_reward, the adaptive KL coefficient and GDPO's per-source rewards in the controller (no
actors): the penalty beta * kl_t joins the token rewards before the advantages, beta moves toward
algo.kl_target once per step, and gdpo normalises each reward source on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlloop.algos.advantages import compute_advantages
from rlloop.algos.kl import AdaptiveKLController, FixedKLController, kl_penalty, make_kl_controller
from rlloop.batch import build_batch, group_index
from rlloop.controller import Trainer
from tests.test_dense_rewards import _rollout, _trainer

torch.set_num_threads(1)


def _kl_trainer(*overrides) -> Trainer:
    trainer = _trainer(*overrides)
    a = trainer.cfg.algo
    trainer.kl_ctl = make_kl_controller(a.kl_coef, a.kl_target, a.kl_horizon)
    return trainer


def _batch_with_logprobs():
    """One group of two: row 0 right (2 response tokens), row 1 wrong (1 token); rollout logprobs -0.5,
    reference logprobs that differ by a known amount on each response token."""
    rollouts = [_rollout("g/0", [1, 2], [3, 4], 1.0), _rollout("g/1", [1, 2], [5], 0.0)]
    batch = build_batch(rollouts, pad_id=0)
    batch.ref_logprobs = np.array([[0, 0, -0.7, -1.5], [0, 0, -0.1, 0]], dtype=np.float32)
    return rollouts, batch


def test_kl_penalty_joins_the_token_rewards_before_the_advantages():
    trainer = _kl_trainer("algo=reinforce_pp", "algo.kl_coef=0.1")  # k2 in the reward
    rollouts, batch = _batch_with_logprobs()
    kl_rewards, metrics = trainer.kl_in_reward(batch)
    # k2 = (x)^2 / 2 with x = log pi_old - log pi_ref = rollout logprobs (-0.5) - ref
    x = np.array([[0, 0, 0.2, 1.0], [0, 0, -0.4, 0]])
    kl = 0.5 * x**2 * batch.response_mask
    np.testing.assert_allclose(kl_rewards.numpy(), -0.1 * kl, atol=1e-7)
    assert metrics["reward/kl_penalty"] == pytest.approx(0.1 * kl.sum(-1).mean())  # per sequence
    assert metrics["reward/kl"] == pytest.approx(np.mean([(0.02 + 0.5) / 2, 0.08]))  # per token, per row
    assert metrics["algo/kl_coef"] == pytest.approx(0.1)

    out = trainer.score(rollouts, batch, None, kl_rewards=kl_rewards, kl_coef=0.1)
    expected = np.array([[0, 0, 0, 1.0], [0, 0, 0, 0]]) * 1.0
    expected[1, 2] = 0.0  # row 1's last response token is column 2; its outcome is 0
    expected = expected - 0.1 * kl
    np.testing.assert_allclose(batch.token_rewards, expected, atol=1e-6)
    mask = torch.from_numpy(batch.response_mask)
    adv, ret = compute_advantages("reinforce_pp", torch.tensor(expected, dtype=torch.float32), mask, group_index(["g", "g"]))
    np.testing.assert_allclose(batch.advantages, adv.numpy(), atol=1e-6)
    np.testing.assert_allclose(batch.returns, ret.numpy(), atol=1e-6)
    assert out["reward/total"] == pytest.approx(0.5)  # the fused reward before the penalty


def test_recomputed_old_logprobs_are_pi_old_when_the_update_has_them():
    trainer = _kl_trainer("algo=reinforce_pp", "algo.kl_coef=1.0", "algo.kl_estimator=k1")
    _, batch = _batch_with_logprobs()
    batch.old_logprobs = batch.ref_logprobs + 0.25  # algo.old_logprobs=recompute: a separate pass
    kl_rewards, _ = trainer.kl_in_reward(batch)
    np.testing.assert_allclose(kl_rewards.numpy(), -0.25 * batch.response_mask, atol=1e-6)


def test_kl_in_reward_off_or_zero_coefficient_adds_nothing():
    _, batch = _batch_with_logprobs()
    assert _kl_trainer("algo=grpo", "algo.kl_coef=0.1").kl_in_reward(batch) == (None, {})  # KL in the loss
    assert _kl_trainer("algo=reinforce_pp", "algo.kl_coef=0").kl_in_reward(batch) == (None, {})


def test_adaptive_coefficient_moves_once_per_step_toward_the_target():
    trainer = _kl_trainer("algo=reinforce_pp", "algo.kl_coef=0.1", "algo.kl_target=0.01", "algo.kl_horizon=100")
    assert isinstance(trainer.kl_ctl, AdaptiveKLController)
    _, batch = _batch_with_logprobs()
    _, first = trainer.kl_in_reward(batch)
    # measured KL 0.165 >> target 0.01: the error clips at +0.2, beta *= 1 + 0.2 * B / horizon
    assert first["algo/kl_coef"] == pytest.approx(0.1)
    assert trainer.kl_ctl.value == pytest.approx(0.1 * (1 + 0.2 * 2 / 100))
    _, second = trainer.kl_in_reward(batch)
    assert second["algo/kl_coef"] == pytest.approx(0.1 * 1.004)  # the coefficient the step used
    low = _kl_trainer("algo=reinforce_pp", "algo.kl_coef=0.1", "algo.kl_target=10", "algo.kl_horizon=100")
    low.kl_in_reward(batch)
    assert low.kl_ctl.value == pytest.approx(0.1 * (1 - 0.2 * 2 / 100))  # KL below target: beta falls
    assert isinstance(_kl_trainer("algo=reinforce_pp").kl_ctl, FixedKLController)


def test_gdpo_normalises_each_reward_source_on_its_own():
    """correct and format (the verifier's named scores, format weighted w_rule * w_format) and the KL
    penalty reach gdpo as columns, not as their sum."""
    trainer = _kl_trainer("algo.advantage=gdpo", "reward.w_format=0.5", "algo.kl_in_reward=true", "algo.kl_coef=0.1",
                          "algo.kl_estimator=k2")  # fmt: skip
    rows = [(1.0, 1.0), (0.0, 1.0), (0.0, 0.0), (1.0, 0.0)]  # (correct, format)
    rollouts = [_rollout(f"g/{i}", [1, 2], [3, 4], c) for i, (c, _) in enumerate(rows)]
    for ro, (c, f) in zip(rollouts, rows):
        ro.outcome = {"correct": c, "format": f}
    batch = build_batch(rollouts, pad_id=0)
    batch.ref_logprobs = np.array([[0, 0, -0.5 - d, -0.5] for d in (0.0, 0.3, 0.6, 0.9)], dtype=np.float32)
    kl_rewards, metrics = trainer.kl_in_reward(batch)
    trainer.score(rollouts, batch, None, kl_rewards=kl_rewards, kl_coef=metrics["algo/kl_coef"])

    mask = torch.from_numpy(batch.response_mask)
    kl_sum = torch.tensor([0.5 * d**2 for d in (0.0, 0.3, 0.6, 0.9)])
    comps = torch.tensor([[c, f] for c, f in rows] + [[0.0, 0.0]] * 0)
    comps = torch.cat([comps, kl_sum[:, None]], dim=1)
    token_rewards = torch.from_numpy(batch.token_rewards)
    adv, _ = compute_advantages("gdpo", token_rewards, mask, group_index(["g"] * 4),
                                reward_components=comps, reward_weights=[1.0, 0.5, -0.1])  # fmt: skip
    np.testing.assert_allclose(batch.advantages, adv.numpy(), atol=1e-5)
    # the summed reward alone (what gdpo got before) ranks the rows differently
    summed, _ = compute_advantages("gdpo", token_rewards, mask, group_index(["g"] * 4))
    assert not np.allclose(batch.advantages, summed.numpy(), atol=1e-3)


def test_k3_matches_the_registry_estimator():
    trainer = _kl_trainer("algo=reinforce_pp", "algo.kl_coef=0.5", "algo.kl_estimator=k3")
    _, batch = _batch_with_logprobs()
    kl_rewards, _ = trainer.kl_in_reward(batch)
    want = -0.5 * kl_penalty("k3", torch.from_numpy(batch.rollout_logprobs), torch.from_numpy(batch.ref_logprobs))
    np.testing.assert_allclose(kl_rewards.numpy(), (want * torch.from_numpy(batch.response_mask)).numpy(), atol=1e-6)


@pytest.mark.slow
def test_reinforce_pp_trains_with_the_kl_penalty_in_its_reward(tmp_path):
    """`python -m rlloop.train algo=reinforce_pp` (k2 KL in the reward, kl_coef 0.001) with a length reward
    that moves the policy at step 1: step 1's penalty is ~0 (the policy is the reference; what is left is
    the rollout engine's logprob mismatch), step 2's is not, and the adaptive coefficient moves."""
    import json

    from tests.conftest import FIXTURES, TINY_RUN, run_cli

    out = tmp_path / "run"
    proc = run_cli(
        [
            *TINY_RUN,
            "task=arith",
            "reward.verifier.sources={arith:custom}",
            "reward.verifier.custom_fn=reward_fixtures:trl_len_reward",
            "algo=reinforce_pp",
            "algo.kl_target=1e-9",  # step 1's KL (~1e-14) lies below it: beta falls by 20% after step 1
            "algo.kl_horizon=16",  # one batch (16 samples) may move beta by 20%
            "trainer.total_steps=2",
            "trainer.eval_before=false",
            "trainer.save_final=false",
            f"hydra.run.dir={out}",
        ],
        env={"PYTHONPATH": FIXTURES},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "reward/kl_penalty" in r}
    assert sorted(steps) == [1, 2]
    assert 0 <= steps[1]["reward/kl_penalty"] < 1e-8  # policy == reference
    assert steps[2]["reward/kl_penalty"] > 1e-6  # the KL of the moved policy, in the reward
    assert steps[1]["algo/kl_coef"] == pytest.approx(0.001)
    assert steps[2]["algo/kl_coef"] == pytest.approx(0.0008)  # one adaptive update per step
    assert steps[2]["reward/kl"] > 0 and steps[2]["kl"] > 0  # the ref pass ran although use_ref=false
