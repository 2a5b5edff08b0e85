"""The Ray shell over RolloutWorkerCore: same answers through the actor, weights through the object store."""

from __future__ import annotations

import numpy as np


def test_rollout_worker_actor(ray_cluster, tiny_model_dir, bpe_tokenizer, make_tiny_llama):
    ray = ray_cluster
    from rlloop.rollout.worker import RolloutWorker, RolloutWorkerCore

    actor = RolloutWorker.options(num_cpus=0.1).remote(tiny_model_dir, seed=0)
    prompt = "Compute 12 + 30.\n\n"
    prompts = [{"uid": "a", "prompt_ids": bpe_tokenizer(prompt)["input_ids"], "prompt_text": prompt}]
    rollouts = ray.get(actor.generate.remote(prompts, n=2, max_new_tokens=8, temperature=0.0), timeout=120)
    local = RolloutWorkerCore(tiny_model_dir, seed=0).generate(
        prompts, n=2, max_new_tokens=8, temperature=0.0
    )
    assert [r.uid for r in rollouts] == ["a/0", "a/1"]
    assert [r.response_ids for r in rollouts] == [r.response_ids for r in local]
    np.testing.assert_allclose(rollouts[0].rollout_logprobs, local[0].rollout_logprobs, atol=1e-5)

    # weights travel as numpy through the object store; the actor receives the resolved dict
    arrays = {k: v.detach().numpy() for k, v in make_tiny_llama(bpe_tokenizer, seed=5).state_dict().items()}
    ref = ray.put(arrays)
    assert ray.get(actor.update_weights.remote(ref, 4), timeout=60) == 4
    assert ray.get(actor.get_policy_version.remote(), timeout=30) == 4
    after = ray.get(actor.generate.remote(prompts, n=1, max_new_tokens=8, temperature=0.0), timeout=120)
    assert after[0].policy_version == 4
    assert after[0].response_ids != rollouts[0].response_ids
    ray.kill(actor)
