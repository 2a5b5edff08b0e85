"""`format` checks, and user reward functions (verl and TRL signatures) wired through config alone."""

from __future__ import annotations

import json

import pytest

from rlloop.rewards.verifiers import VerifyRequest, get_verifier
from rlloop.rewards.verifiers.pool import VerifierPool

verify_format = get_verifier("format")
verify_custom = get_verifier("custom")
GOOD = "Add the tens: 40 + 10 = 50.\n\nAdd the ones: 2 + 4 = 6.\n\nSo the sum is \\boxed{56}."


@pytest.mark.parametrize(
    "text,checks,expected",
    [
        (GOOD, ["one_boxed", "steps"], {"one_boxed": 1.0, "steps": 1.0}),
        ("The sum is \\boxed{56}.", ["one_boxed", "steps"], {"one_boxed": 1.0, "steps": 0.0}),
        ("Step.\n\n\\boxed{5} or \\boxed{6}", ["one_boxed", "steps"], {"one_boxed": 0.0, "steps": 1.0}),
        ("Step.\n\n   \n\nno answer", ["one_boxed", "steps"], {"one_boxed": 0.0, "steps": 1.0}),
        (GOOD, ["boxed_last"], {"boxed_last": 1.0}),
        ("\\boxed{56} because reasons", ["boxed_last"], {"boxed_last": 0.0}),
    ],
)
def test_format_checks(text, checks, expected):
    result = verify_format(VerifyRequest("f", "x", text, ""), checks=checks)
    for key, value in expected.items():
        assert result.scores[key] == value
    assert result.score == pytest.approx(sum(expected.values()) / len(expected))
    assert (result.reason == "") == (result.score == 1.0)


def test_format_regex_and_bad_options():
    req = VerifyRequest("f", "x", "<think>hmm</think> 42", "")
    assert verify_format(req, checks=["regex"], pattern=r"<think>.*</think>.*").score == 1.0
    assert verify_format(req, checks=["regex"], pattern=r"<answer>.*").score == 0.0
    with pytest.raises(ValueError, match="pattern"):
        verify_format(req, checks=["regex"])
    with pytest.raises(ValueError, match="nope"):
        verify_format(req, checks=["nope"])


def test_custom_in_process_verl_dict_and_trl():
    req = VerifyRequest("u", "user", "so 12", "12", prompt="q?", extra={"as_dict": True})
    result = verify_custom(req, fn="reward_fixtures:verl_compute_score")
    assert result.score == 1.0 and result.scores["acc"] == 1.0 and result.scores["length"] == 5.0
    assert "pred" not in result.scores  # non-numeric extras are not scores
    trl = verify_custom(
        VerifyRequest("u", "user", "so 12", "12", prompt="q?", extra={"bonus": True}),
        fn="reward_fixtures:trl_reward",
    )
    assert trl.score == 1.0
    no_prompt = verify_custom(VerifyRequest("u", "user", "1234", "x"), fn="reward_fixtures:trl_len_reward")
    assert no_prompt.score == pytest.approx(1 / 5)


def test_verl_function_through_config_alone(ray_cluster):
    cfg = {
        "num_workers": 1,
        "timeout_s": 5.0,
        "sources": {"arith": "math", "fmt": "format", "py": "code", "user": "custom"},
        "custom_fn": "reward_fixtures:verl_compute_score",
        "options": {"format": {"checks": ["one_boxed", "steps"]}, "code": {"wall_s": 3.0}},
    }
    with VerifierPool(cfg) as pool:
        results = pool.score(
            [
                VerifyRequest("v1", "user", "The answer is 56", "56"),
                VerifyRequest("v2", "user", "The answer is 55", "56"),
                VerifyRequest("v3", "user", "56", "56", extra={"as_dict": True}),
                VerifyRequest("m1", "arith", GOOD, "56"),
                VerifyRequest("f1", "fmt", GOOD, ""),
                VerifyRequest(
                    "p1",
                    "py",
                    "```python\nprint(sum(map(int, input().split())))\n```",
                    json.dumps({"inputs": ["2 3"], "outputs": ["5"]}),
                ),
            ]
        )
    assert [r.score for r in results] == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert results[2].scores == {"score": 1.0, "acc": 1.0, "length": 2.0}  # every named score comes back
    assert results[3].scores == {"correct": 1.0, "format": 1.0}
    assert results[4].scores["format"] == 1.0


def test_trl_function_through_config_alone(ray_cluster):
    cfg = {
        "num_workers": 1,
        "timeout_s": 5.0,
        "sources": {"*": "custom"},
        "custom_fn": "reward_fixtures:trl_reward",
    }
    with VerifierPool(cfg) as pool:
        results = pool.score(
            [
                VerifyRequest("t1", "any", "answer: 7", "7", prompt="What is 3+4?", extra={"bonus": True}),
                VerifyRequest("t2", "any", "answer: 8", "7", prompt="What is 3+4?"),
                VerifyRequest("t3", "other", "7", "7", prompt=""),
            ]
        )
    assert [r.score for r in results] == [1.0, 0.0, 0.5]
