"""PRMPool: two replicas score exactly what one does, in submission order; weights broadcast by version."""

from __future__ import annotations

import numpy as np
import pytest

from rlloop.rollout.steps import split_steps

PROMPTS = [
    "Question: what is 12 + 30?\n\n",
    "Q: 2+2?",
    "Question: what is 7 - 5?\n\n",
    "Step one.",
    "Question: what is 12 + 30?\n\n",
]
RESPONSES = [
    "First we add 10 and 30.\n\nThen we add 2.\n\nThe answer is 42.\n\nCheck: 42 - 30 = 12.",
    "It is 4.",
    "We take 5 from 7.\n\nThe answer is \\boxed{2} ✓",
    "The next step.\n\nThe final answer is 42.",
    "First.\n\nSecond ✓",
]
ENDS = [[end for _, end in split_steps(r)] for r in RESPONSES]  # exclusive end character of each step


def test_two_replicas_score_like_one_in_submission_order(ray_cluster, prm_dir):
    from rlloop.rewards.prm.pool import PRMPool
    from rlloop.rewards.prm.service import PRMScorer

    ray = ray_cluster
    one = PRMPool.start(1, prm_dir, batch_size=4, timeout_s=120)
    two = PRMPool.start(2, prm_dir, batch_size=4, timeout_s=120)
    try:
        prompts, responses, ends = PROMPTS * 4, RESPONSES * 4, ENDS * 4
        weights = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
        pending = two.submit(prompts, responses, ends, weights)
        assert [replica for replica, *_ in pending.shares] == [0, 1]  # both replicas got work
        loads = [sum(weights[i] for i in rows) for _, rows, *_ in pending.shares]
        assert abs(loads[0] - loads[1]) <= max(weights)  # balanced by size, not by count
        got, stats = two.gather(pending)
        want = one.score(prompts, responses, ends)
        assert stats["tokens"] > 0 and stats["padded_tokens"] >= stats["tokens"] and stats["seconds"] > 0
        local = PRMScorer(prm_dir).score(prompts, responses, ends)
        for g, w, lo in zip(got, want, local, strict=True):
            assert len(g["step_values"]) == len(w["step_values"]) > 0
            np.testing.assert_allclose(g["step_values"], w["step_values"], atol=1e-5)
            np.testing.assert_allclose(g["step_values"], lo["step_values"], atol=1e-5)
            assert g["prompt_value"] == pytest.approx(w["prompt_value"], abs=1e-5)
        # distinct values per trajectory: a shuffled gather could not have passed
        assert len({round(g["step_values"][0], 6) for g in got[:4]}) == 4
    finally:
        one.kill()
        two.kill()
    assert ray.is_initialized()


@pytest.mark.parametrize("transport", ["object_store", "shm", "collective"])
def test_broadcast_gives_every_replica_the_trainer_weights_and_version(
    ray_cluster, prm_dir, plain_lm_dir, transport
):
    """Through each weight transport (rlloop.distributed.transport), as cluster.weight_transport picks."""
    from rlloop.distributed.transport import CollectiveGroup
    from rlloop.rewards.prm.pool import PRMPool
    from rlloop.rewards.prm.service import PRMScorer

    ray = ray_cluster
    pool = PRMPool.start(2, plain_lm_dir, timeout_s=120)  # fresh heads: V = 0.5 everywhere
    pool.set_transport(transport, CollectiveGroup("gloo", 60.0))
    try:
        ray.get([a.__ray_ready__.remote() for a in pool.actors], timeout=300)  # start-up, slow under load
        trained = PRMScorer(prm_dir)
        # the trainer replica (0) holds new weights at version 3; replica 1 still has the fresh head
        ref = ray.put(trained.state_dict_numpy())
        assert ray.get(pool.actors[0].load_state_numpy.remote(ref, 3), timeout=60) == 3
        pool.broadcast(pool.actors[0].state_dict_numpy.remote(), 3)
        if transport == "collective":
            assert pool.group.generation == 1 and not pool.group.stale
        assert ray.get([a.__ray_call__.remote(lambda s: s.version) for a in pool.actors], timeout=60) == [
            3,
            3,
        ]
        got = pool.score(PROMPTS, RESPONSES, ENDS)
        for g, w in zip(got, trained.score(PROMPTS, RESPONSES, ENDS), strict=True):
            np.testing.assert_allclose(g["step_values"], w["step_values"], atol=1e-5)
    finally:
        pool.kill()


def test_submit_checks_lengths_and_replica_count(ray_cluster, prm_dir):
    from rlloop.rewards.prm.pool import PRMPool

    with pytest.raises(ValueError, match="num_replicas=0"):
        PRMPool.start(0, prm_dir)
    pool = PRMPool([object()])  # no call is made before the check
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        pool.submit(["a", "b"], ["x"], [[1]])
