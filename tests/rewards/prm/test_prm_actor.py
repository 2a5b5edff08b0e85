"""The Ray shell over PRMScorer: scores through the actor, weights in and out as numpy."""

from __future__ import annotations

import numpy as np


def test_prm_service_actor(ray_cluster, prm_dir, plain_lm_dir):
    ray = ray_cluster
    from rlloop.rewards.prm.service import PRMScorer, PRMService

    prompts = ["Question: what is 12 + 30?\n\n", "Q: 2+2?"]
    responses = ["First we add 10 and 30.\n\nThen we add 2.\n\nThe answer is 42.", "It is 4."]
    actor = PRMService.options(num_cpus=0.1).remote(plain_lm_dir, batch_size=4)  # fresh head: V = 0.5
    before = ray.get(actor.score.remote(prompts, responses), timeout=120)
    assert [len(r["step_values"]) for r in before] == [3, 1]
    assert all(v == 0.5 for r in before for v in r["step_values"])

    # online mode: new PRM weights travel as numpy through the object store, and come back out
    trained = PRMScorer(prm_dir)
    assert ray.get(actor.load_state_numpy.remote(ray.put(trained.state_dict_numpy()), 1), timeout=60) == 1
    after = ray.get(actor.score.remote(prompts, responses), timeout=120)
    for a, b in zip(after, trained.score(prompts, responses), strict=True):
        np.testing.assert_allclose(a["step_values"], b["step_values"], atol=1e-6)
    arrays = ray.get(actor.state_dict_numpy.remote(), timeout=60)
    np.testing.assert_array_equal(arrays["head.weight"], trained.model.head.weight.detach().numpy())
    ray.kill(actor)
