"""Off-policy training end to end on model=tiny: every actor for real, bucketed sync, sync probe.

one_step: step k+1's batch is generated while the learner updates on step k, so from step 2 on every
trained sample is exactly one policy version old. bounded with max_staleness=0: the batch generated
ahead is one version too old when its step comes, so it is regenerated (stale_policy=wait) — in both,
no trained sample is ever older than max_staleness (learner version - the samples' policy_version).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, TINY_RUN, run_cli

FIXTURES = str(ROOT / "tests" / "rewards" / "verifiers")
LENGTH_REWARD = [
    "reward.verifier.sources={arith:custom}",
    "reward.verifier.custom_fn=reward_fixtures:trl_len_reward",
]
ASYNC_KEYS = {
    "async/staleness_mean",
    "async/staleness_max",
    "async/dropped",
    "async/learner_version",
    "sync/buckets",
    "sync/mb",
    "time/sync",
}


def _run(tmp_path, *extra: str) -> list[dict]:
    out = tmp_path / "run"
    proc = run_cli(
        [
            *TINY_RUN,
            "trainer.total_steps=4",
            "learner.world_size=1",
            "reward=rule",
            *LENGTH_REWARD,
            "algo.tis_cap=2.0",
            "learner.sync_bucket_mb=0.05",  # model=tiny is ~0.5 MB: about 10 buckets
            "learner.sync_probe_every=2",
            "trainer.save_final=false",
            *extra,
            f"hydra.run.dir={out}",
        ],
        env={"PYTHONPATH": FIXTURES},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward/total" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert not ASYNC_KEYS - r.keys(), f"metrics lack {ASYNC_KEYS - r.keys()}"
        assert r["sync/buckets"] > 1 and r["sync/mb"] > 0
        # the oldest trained sample against the learner version the update started from
        assert r["async/learner_version"] == r["step"] - 1
        assert r["async/learner_version"] - r["rollout/policy_version"] == r["async/staleness_max"]
    probes = [r["sync/probe_logprob_mismatch"] for r in train if "sync/probe_logprob_mismatch" in r]
    assert len(probes) == 2 and all(0 <= p < 1e-3 for p in probes), probes
    return train


@pytest.mark.slow
def test_one_step_off_policy_trains_on_one_version_old_samples(tmp_path):
    train = _run(tmp_path, "trainer.async_mode=one_step", "trainer.max_staleness=1")
    assert train[0]["async/staleness_max"] == 0  # step 1 waits for a fresh batch
    # batch k+1 is queued before update k is synced, so it samples from version k-1
    later = [r["async/staleness_max"] for r in train[1:]]
    assert set(later) <= {0, 1} and later.count(1) >= 2, later
    assert all(r["async/dropped"] == 0 for r in train)
    assert all(r["actor/tis_weight_mean"] > 0 for r in train)  # importance weights on rollout logprobs


@pytest.mark.slow
def test_bounded_never_trains_on_samples_older_than_max_staleness(tmp_path):
    train = _run(
        tmp_path,
        "trainer.async_mode=bounded",
        "trainer.max_staleness=0",
        "trainer.async_lookahead=1",
        "trainer.stale_policy=wait",
    )
    assert all(r["async/staleness_max"] == 0 for r in train)
    assert all(r["async/learner_version"] == r["rollout/policy_version"] for r in train)
    # a batch generated before the last update was synced is too old: regenerated with the new weights
    assert train[0]["async/dropped"] == 0
    assert sum(r["async/dropped"] for r in train[1:]) >= 16
