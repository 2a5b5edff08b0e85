"""VerifierPool over Ray: routing, streaming, per-sample timeouts, hung and crashed workers, bad config."""

from __future__ import annotations

import os
import time

import pytest

from rlloop.rewards.verifiers import VerifyRequest
from rlloop.rewards.verifiers.pool import VerifierPool

MISBEHAVE = "reward_fixtures:misbehave"


@pytest.fixture(scope="module")
def pool(ray_cluster):
    cfg = {
        "num_workers": 2,
        "timeout_s": 1.0,
        "sources": {"arith": "math", "user": "custom", "*": "math"},
        "custom_fn": MISBEHAVE,
    }
    p = VerifierPool(cfg)
    yield p
    p.shutdown()


def req(uid, solution, gold, source="arith", **extra):
    return VerifyRequest(uid=uid, data_source=source, solution_str=solution, ground_truth=gold, extra=extra)


def test_right_wrong_unparsable_in_order(pool):
    requests = [
        req("a", "12+44=56\n\n\\boxed{56}", "56"),
        req("b", "\\boxed{55}", "56"),
        req("c", "I do not know", "56"),
        req("d", "Natalia... #### 72", "#### 72", source="gsm8k"),  # '*' fallback
        req("e", "\\boxed{-3}", "-3"),
    ]
    results = pool.score(requests)
    assert [r.uid for r in results] == ["a", "b", "c", "d", "e"]
    assert [r.score for r in results] == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert results[0].scores == {"correct": 1.0, "format": 1.0}
    assert results[1].reason == ""
    assert "no \\boxed{}" in results[2].reason


def test_streaming_submit_then_collect_by_uid(pool):
    pool.submit([req(f"s{i}", f"\\boxed{{{i}}}", str(i)) for i in range(40)])
    pool.submit([req(f"t{i}", f"\\boxed{{{i + 1}}}", str(i)) for i in range(40)])
    later = pool.collect([f"t{i}" for i in range(39, -1, -1)])  # any subset, any order
    assert [r.uid for r in later] == [f"t{i}" for i in range(39, -1, -1)]
    assert all(r.score == 0.0 for r in later)
    rest = pool.collect()
    assert [r.uid for r in rest] == [f"s{i}" for i in range(40)]
    assert all(r.score == 1.0 for r in rest)
    with pytest.raises(KeyError, match="s0"):
        pool.collect(["s0"])


def test_duplicate_uid_and_unknown_source_rejected(pool):
    pool.submit([req("dup", "\\boxed{1}", "1")])
    with pytest.raises(ValueError, match="dup"):
        pool.submit([req("dup", "\\boxed{1}", "1")])
    assert pool.collect(["dup"])[0].score == 1.0


def test_soft_timeout_is_a_zero_with_reason(pool):
    t0 = time.monotonic()
    results = pool.score(
        [req("slow", "1", "1", "user", mode="sleepy", sleep=30), req("ok", "\\boxed{2}", "2")]
    )
    assert time.monotonic() - t0 < 10
    assert results[0].score == 0.0 and results[0].reason.startswith("timeout")
    assert results[1].score == 1.0


def test_user_function_exception_is_a_reason(pool):
    (result,) = pool.score([req("boom", "1", "1", "user", mode="raises")])
    assert result.score == 0.0 and "user function bug" in result.reason


def test_hung_worker_replaced_and_sample_failed_after_one_retry(pool):
    restarts = pool.restarts
    t0 = time.monotonic()
    results = pool.score(
        [req("hang", "1", "1", "user", mode="stubborn", sleep=60)]
        + [req(f"h{i}", "\\boxed{7}", "7") for i in range(20)]
    )
    elapsed = time.monotonic() - t0
    assert results[0].score == 0.0 and "hung" in results[0].reason and "twice" in results[0].reason
    assert all(r.score == 1.0 for r in results[1:])  # its neighbours were re-queued, not failed
    assert pool.restarts == restarts + 2
    assert elapsed < 30
    assert pool.score([req("after", "\\boxed{1}", "1")])[0].score == 1.0  # still serving


def test_crashed_worker_replaced_retry_succeeds(pool, tmp_path):
    restarts = pool.restarts
    marker = str(tmp_path / "crashed_once")
    results = pool.score(
        [req("crash1", "5", "5", "user", mode="crashy", marker=marker), req("n1", "\\boxed{3}", "3")]
    )
    assert os.path.exists(marker)
    assert results[0].score == 1.0 and results[0].reason == ""  # second attempt ran on a fresh worker
    assert results[1].score == 1.0
    assert pool.restarts == restarts + 1


def test_crash_twice_recorded_as_failed(pool):
    (result,) = pool.score([req("crash2", "5", "5", "user", mode="crashy")])
    assert result.score == 0.0 and "crashed" in result.reason and "twice" in result.reason


def test_collect_timeout_never_blocks_longer(pool):
    pool.submit([req("late", "1", "1", "user", mode="sleepy", sleep=0.8)])
    t0 = time.monotonic()
    (result,) = pool.collect(["late"], timeout=0.2)
    assert time.monotonic() - t0 < 0.6
    assert result.score == 0.0 and "collect timeout" in result.reason
    time.sleep(1.0)  # the abandoned sample's late result must not leak into a later submission
    (again,) = pool.score([req("late", "\\boxed{9}", "8")])
    assert again.score == 0.0 and again.reason == ""


def test_check_sources(pool):
    pool.check_sources(["arith", "gsm8k", "user"])


# ---- start-up validation: every bad config fails in __init__, before any worker starts ----


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"sources": {"arith": "maths"}}, "maths"),
        ({"sources": {}}, "sources"),
        ({"sources": {"u": "custom"}, "custom_fn": "no_such_module_xyz:f"}, "no_such_module_xyz"),
        ({"sources": {"u": "custom"}, "custom_fn": "reward_fixtures:missing"}, "missing"),
        ({"sources": {"u": "custom"}, "custom_fn": "reward_fixtures:wrong_signature"}, "wrong_signature"),
        ({"sources": {"u": "custom"}}, "custom_fn"),
        ({"sources": {"a": "math"}, "options": {"math": {"extrakt": "boxed"}}}, "extrakt"),
        ({"sources": {"a": "math"}, "num_workers": 0}, "num_workers"),
    ],
)
def test_bad_config_fails_at_construction(ray_cluster, cfg, match):
    with pytest.raises(ValueError, match=match):
        VerifierPool(cfg)


def test_start_timeout_is_the_callers(ray_cluster):
    # the trainer passes trainer.call_timeout_s: a loaded machine may need minutes to start a worker
    with pytest.raises(ValueError, match="start_timeout_s"):
        VerifierPool({"sources": {"a": "math"}}, start_timeout_s=0)
    with pytest.raises(RuntimeError, match="failed to start"):  # no fresh process answers in 0.1 ms
        VerifierPool({"num_workers": 1, "sources": {"a": "math"}}, start_timeout_s=1e-4)


def test_a_worker_killed_while_starting_is_replaced(ray_cluster, monkeypatch):
    # what the chaos soak hit: a learner restart builds a new pool, and a verifier worker dies before it
    # has answered its first call; the pool replaces it instead of failing the run's restart
    import ray

    start, killed = VerifierPool._start_worker, []

    def start_then_kill_the_first(self, index):
        w = start(self, index)
        if not killed:
            killed.append(w.actor)
            ray.kill(w.actor, no_restart=True)
        return w

    monkeypatch.setattr(VerifierPool, "_start_worker", start_then_kill_the_first)
    with VerifierPool({"num_workers": 2, "sources": {"arith": "math"}}) as p:
        assert p.restarts == 1 and len(killed) == 1
        assert isinstance(p.isolation, dict)
        assert [r.score for r in p.score([req("a", "\\boxed{3}", "3"), req("b", "\\boxed{4}", "3")])] == [1.0, 0.0]


def test_unmapped_source_is_a_clear_error(ray_cluster):
    with VerifierPool({"num_workers": 1, "sources": {"arith": "math"}}) as p:
        with pytest.raises(ValueError, match="'gsm8k'"):
            p.check_sources(["arith", "gsm8k"])
        with pytest.raises(ValueError, match="'gsm8k'"):
            p.submit([req("x", "\\boxed{1}", "1", source="gsm8k")])


def test_accepts_structured_config(ray_cluster):
    from omegaconf import OmegaConf

    from rlloop.config import VerifierConfig

    cfg = OmegaConf.structured(VerifierConfig(num_workers=1))
    with VerifierPool(cfg) as p:
        assert p.score([req("z", "\\boxed{2}", "2")])[0].score == 1.0
