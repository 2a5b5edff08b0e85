"""Bucketed, versioned weight sync: planning and staging (pure), then 2 DeepSpeed ranks -> a rollout worker.

The Ray test checks that a bucketed sync (many tiny buckets) leaves the rollout worker with exactly the
weights of a full state-dict copy — same sampled tokens, same logprobs — and that those logprobs are the
learner's, under ZeRO-2 and ZeRO-3 with 2 ranks; and that a partial version is never served.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from rlloop.distributed.weight_sync import BucketStager, plan_buckets

from .conftest import algo_cfg, learner_cfg, make_batch

TEMPERATURE = 0.7


# ---------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    "sizes, limit, expected",
    [
        ([4, 4, 4], 8, [[0, 1], [2]]),
        ([4, 4, 4], 4, [[0], [1], [2]]),
        ([20, 1, 1], 8, [[0], [1, 2]]),  # a tensor bigger than a bucket gets its own
        ([1, 20, 1], 8, [[0], [1], [2]]),
        ([3], 1000, [[0]]),
        ([], 8, []),
    ],
)
def test_plan_buckets(sizes, limit, expected):
    assert plan_buckets(sizes, limit) == expected


def test_plan_buckets_bounds_and_order():
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(1, 100, size=200)]
    for limit in (1, 50, 120, 10_000):
        buckets = plan_buckets(sizes, limit)
        assert [i for b in buckets for i in b] == list(range(len(sizes)))
        for b in buckets:
            assert len(b) == 1 or sum(sizes[i] for i in b) <= limit
    with pytest.raises(ValueError, match="sync_bucket_mb"):
        plan_buckets([1], 0)


def test_stager_serves_only_complete_versions():
    stager = BucketStager()
    a, b, c = {"a": np.zeros(2)}, {"b": np.ones(2)}, {"c": np.full(2, 2.0)}
    assert stager.add(3, 1, 3, b, serving=2) is None
    assert stager.add(3, 0, 3, a, serving=2) is None
    with pytest.raises(ValueError, match="bucket 2/3 of version 3 arrived twice"):
        stager.add(3, 1, 3, b, serving=2)
    merged = stager.add(3, 2, 3, c, serving=2)
    assert sorted(merged) == ["a", "b", "c"] and stager.staged == 0
    # an aborted version is dropped when a newer one starts; an older one is refused
    assert stager.add(4, 0, 2, a, serving=3) is None
    assert stager.add(5, 0, 2, b, serving=3) is None and stager.staged == 1
    assert sorted(stager.add(5, 1, 2, c, serving=3)) == ["b", "c"]
    with pytest.raises(ValueError, match="version 4: the worker already serves version 5"):
        stager.add(4, 0, 1, a, serving=5)
    with pytest.raises(ValueError, match="outside"):
        stager.add(6, 2, 2, a, serving=5)


# ---------------------------------------------------------------- learner ranks -> rollout workers


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    """rlloop's `tiny` model (Llama + its own tokenizer) at a small size, so the rollout worker can run."""
    from rlloop.config import ModelConfig
    from rlloop.models.builders import build_tiny

    cfg = ModelConfig(name="tiny", hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
    return build_tiny(cfg, tmp_path_factory.mktemp("tiny_lm") / "model")


def _prompts(model_path: str) -> list[dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    texts = ["12 + 30 =", "What is 7 - 5?", "The quick brown fox"]
    return [
        {"uid": f"p{i}", "prompt_ids": tok(t)["input_ids"], "prompt_text": t} for i, t in enumerate(texts)
    ]


def _sync_check(ray, model_path: str, zero_stage: int) -> dict:
    from rlloop.distributed.weight_sync import WeightSyncError, push_weights, wait_loaded
    from rlloop.learner.group import LearnerError, LearnerGroup
    from rlloop.rollout.worker import RolloutWorker

    batch = make_batch(num_rows=4, seed=3)
    group = LearnerGroup(
        model_path,
        learner_cfg(world_size=2, zero_stage=zero_stage),
        algo_cfg(use_ref=False),
        temperature=TEMPERATURE,
        train_batch_size=len(batch),
        num_cpus_per_rank=0.5,
        timeout_s=300,
    )
    workers = [RolloutWorker.options(num_cpus=0.1).remote(model_path, seed=0) for _ in range(2)]
    gen = {"n": 2, "max_new_tokens": 10, "temperature": TEMPERATURE, "seed": 7}
    out: dict = {}
    try:
        train = copy.copy(batch)
        train.old_logprobs = group.compute_logprobs(batch)
        group.train_step(train)  # the learner's weights now differ from the workers' initial ones
        prompts = _prompts(model_path)
        out["initial"] = ray.get(workers[0].generate.remote(prompts, **gen), timeout=120)
        # worker 0: bucketed (1 KB buckets: one per tensor); worker 1: one full state-dict copy
        result = push_weights(group, workers[:1], 1, bucket_mb=1e-3, timeout_s=120)
        out["versions"] = wait_loaded(result, timeout_s=120)
        out["buckets"] = len(result.bucket_refs)
        out["sync_mb"] = result.metrics()["sync/mb"]
        full = group.state_dict_ref()
        assert ray.get(workers[1].update_weights.remote(full, 1), timeout=60) == 1
        out["bucketed"] = ray.get(workers[0].generate.remote(prompts, **gen), timeout=120)
        out["full"] = ray.get(workers[1].generate.remote(prompts, **gen), timeout=120)
        # learner logprobs of the sampled sequences (the sync probe)
        from rlloop.batch import build_batch

        probe = build_batch(out["bucketed"], pad_id=0)
        out["learner_lp"] = group.compute_logprobs(probe)
        out["probe"] = probe
        # a partial version (all buckets but the last) is staged, never served
        refs = result.bucket_refs
        partial = [workers[0].load_weight_bucket.remote(2, b, len(refs), r) for b, r in enumerate(refs[:-1])]
        out["partial_versions"] = ray.get(partial, timeout=60)
        out["during_partial"] = ray.get(workers[0].generate.remote(prompts, **gen), timeout=120)
        out["after_last"] = ray.get(
            workers[0].load_weight_bucket.remote(2, len(refs) - 1, len(refs), refs[-1]), timeout=60
        )
        # timeouts name the culprit: a learner gather, a worker busy generating a long batch
        with pytest.raises(LearnerError, match=rf"rank 0.* running 'send_weight_bucket 1/{len(refs)} \(object_store\)'"):
            group.gather_weight_bucket(0, len(refs), timeout_s=1e-4)
        busy = workers[0].generate.remote(prompts * 8, **{**gen, "max_new_tokens": 60})
        result = push_weights(group, workers[:1], 3, bucket_mb=1e-3, timeout_s=120)
        with pytest.raises(
            WeightSyncError, match=rf"version 3: rollout worker 0, bucket 1/{len(refs)} .*no answer"
        ):
            wait_loaded(result, timeout_s=0.01)
        ray.get(busy, timeout=300)
        out["after_timeout"] = wait_loaded(result, timeout_s=120)  # the sync itself completes
    finally:
        group.shutdown()
        for w in workers:
            ray.kill(w)
    return out


@pytest.fixture(scope="module")
def synced(ray_cluster, tiny_lm) -> dict:
    return {stage: _sync_check(ray_cluster, tiny_lm, stage) for stage in (2, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_bucketed_sync_equals_full_state_dict_copy(synced, stage):
    run = synced[stage]
    assert run["buckets"] > 10 and run["versions"] == [1]
    assert run["sync_mb"] > 0.1
    ids = lambda rollouts: [r.response_ids for r in rollouts]  # noqa: E731
    assert ids(run["bucketed"]) == ids(run["full"])
    assert ids(run["bucketed"]) != ids(run["initial"])  # the sync changed the policy
    for a, b in zip(run["bucketed"], run["full"], strict=True):
        assert a.policy_version == b.policy_version == 1
        assert a.rollout_logprobs == b.rollout_logprobs  # identical, not close
    # ... and they are the learner's logprobs of the same tokens
    mask = run["probe"].response_mask > 0
    np.testing.assert_allclose(run["learner_lp"][mask], run["probe"].rollout_logprobs[mask], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_partial_version_is_never_served(synced, stage):
    run = synced[stage]
    assert run["partial_versions"] == [1] * (run["buckets"] - 1)
    assert all(r.policy_version == 1 for r in run["during_partial"])
    assert [r.response_ids for r in run["during_partial"]] == [r.response_ids for r in run["bucketed"]]
    assert run["after_last"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_sync_timeouts_name_rank_worker_and_bucket(synced, stage):
    assert synced[stage]["after_timeout"] == [3]
