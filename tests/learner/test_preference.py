"""The learner's DPO-family update (rlloop.learner.preference) on an in-process world-size-1 rank."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlloop.learner.group import pad_rows, shard_slices
from rlloop.learner.preference import pair_counts
from tests.learner.conftest import algo_cfg, inprocess_learner, make_batch


def test_pair_counts_and_whole_pair_padding():
    batch = make_batch(num_rows=6, seed=1)
    batch.response_mask[3] = 0  # pair 1 loses its rejected side: no pair
    padded, n = pad_rows(batch, 2 * 4)  # 4 ranks: padded by whole pairs to 8 rows, 2 a rank
    assert len(padded) == 8 and n == 6
    shards = shard_slices(len(padded), 4)
    assert pair_counts(padded.response_mask, shards) == [1, 0, 1, 0]


def _dpo_learner(path, port, micro_batch_size, policy_loss="dpo"):
    algo = algo_cfg(policy_loss=policy_loss, dpo={"beta": 0.5, "alpha": 0.5})
    return inprocess_learner(path, port, algo=algo, zero_stage=0, micro_batch_size=micro_batch_size, lr=1e-3)


def test_dpo_step_starts_at_log2_and_raises_the_margin(tiny_model_path, dist_port):
    learner = _dpo_learner(tiny_model_path, dist_port, micro_batch_size=2)
    batch = make_batch(num_rows=6, seed=2)
    batch.ref_logprobs = learner.compute_logprobs(batch, "ref")
    from rlloop.learner.preference import preference_train_step

    first = preference_train_step(learner, batch)
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is the reference
    assert first["dpo/margin"] == pytest.approx(0.0, abs=1e-5)
    second = preference_train_step(learner, batch)
    assert second["dpo/margin"] > 0 and second["dpo/loss"] < math.log(2)
    assert second["dpo/accuracy"] > 0
    assert learner.version == 2


def test_micro_batches_do_not_change_the_update(tiny_model_path, dist_port):
    """Whole pairs per micro-batch, each pair weighted 1 / pairs: one or two micro-batches take the same two
    steps (Adam divides by |g|, so a wrong relative weight of the micro-batches would show, a common scale not)."""
    from rlloop.learner.preference import preference_train_step

    batch = make_batch(num_rows=6, seed=3)
    batch.token_rewards = np.random.default_rng(0).normal(size=batch.input_ids.shape).astype(np.float32)
    states = []
    for micro in (4, 6):  # micro-batches of 2 + 1 pairs against one of 3
        learner = _dpo_learner(tiny_model_path, dist_port, micro_batch_size=micro, policy_loss="tgdpo")
        batch.ref_logprobs = learner.compute_logprobs(batch, "ref")
        preference_train_step(learner, batch)
        metrics = preference_train_step(learner, batch)
        states.append((learner.full_state_dict(), metrics))
    (a, ma), (b, mb) = states
    for key in a:
        np.testing.assert_allclose(
            a[key], b[key], rtol=1e-4, atol=5e-5, err_msg=key
        )  # Adam: ~g/|g| near g = 0
    assert ma["dpo/margin"] == pytest.approx(mb["dpo/margin"], rel=1e-4)
    assert "tgdpo/guidance_chosen" in ma
