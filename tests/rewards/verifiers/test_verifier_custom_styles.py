"""The custom verifier's signatures (verl, TRL batched and async, OpenRLHF), from a file path or a module,
and the worker's batched path (one call per chunk; per-sample blame when the batch fails)."""

from __future__ import annotations

import textwrap

import pytest

from rlloop.rewards.verifiers import VerifyRequest, get_verifier
from rlloop.rewards.verifiers.custom import absolute_custom_fn, load_custom_fn
from rlloop.rewards.verifiers.worker import VerifierWorkerCore

verify_custom = get_verifier("custom")
CHAT = [{"role": "user", "content": "What is 3+4?"}]


def test_verl_gets_extra_info_as_is():
    # verl's layout: extra holds the row's other columns, extra_info among them; the function gets only it
    extra = {"ability": "math", "extra_info": {"weight": 0.5}, "reward_model": {"ground_truth": "7"}}
    req = VerifyRequest("v", "gsm8k", "so 7", "7", extra=extra)
    assert verify_custom(req, fn="reward_fixtures:verl_echo_extra_info").score == 0.5
    # rows without an extra_info column hand over all their columns (as before)
    req = VerifyRequest("v", "x", "so 12", "12", extra={"as_dict": True})
    assert verify_custom(req, fn="reward_fixtures:verl_compute_score").scores["acc"] == 1.0


def test_openrlhf_signature_and_its_dict():
    assert load_custom_fn("reward_fixtures:openrlhf_reward")[1] == "openrlhf"
    req = VerifyRequest("o", "x", " 42", "42", prompt="<|user|>6*7?<|assistant|>")
    result = verify_custom(req, fn="reward_fixtures:openrlhf_reward")
    assert result.score == 1.0 and result.scores == {"score": 1.0, "query_len": 28.0}
    batch = verify_custom.verify_batch(
        [req, VerifyRequest("p", "x", " 41", "42", prompt="q")], fn="reward_fixtures:openrlhf_reward"
    )
    assert [r.score for r in batch] == [1.0, 0.0] and [r.uid for r in batch] == ["o", "p"]


def test_trl_chat_completions_columns_and_async():
    reqs = [
        VerifyRequest("a", "x", "7", "7", prompt="<rendered>", raw_prompt=CHAT),
        VerifyRequest("b", "x", "7", "7", prompt="<rendered>", raw_prompt="What is 3+4?"),
    ]
    assert [r.score for r in verify_custom.verify_batch(reqs, fn="reward_fixtures:trl_async_reward")] == [
        1.0,
        0.5,
    ]


def test_trl_from_a_file_path_batched_with_columns(tmp_path, monkeypatch):
    f = tmp_path / "my_reward.py"
    f.write_text(
        textwrap.dedent(
            """
            CALLS = []

            def accuracy(prompts, completions, solution, level, **kwargs):
                CALLS.append(len(completions))
                return [
                    None if lv is None else float(c[0]["content"].strip() == s)
                    for c, s, lv in zip(completions, solution, level)
                ]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    spec = absolute_custom_fn("my_reward.py:accuracy")  # relative files are taken from the start directory
    assert spec == f"{f}:accuracy"
    fn, style = load_custom_fn(spec)
    assert style == "trl"
    reqs = [
        VerifyRequest(f"u{i}", "x", text, "7", raw_prompt=CHAT, extra={"solution": "7", "level": lvl})
        for i, (text, lvl) in enumerate([("7", 1), ("8", 1), ("7", None)])
    ]
    reqs.append(VerifyRequest("u3", "x", "7", "7", raw_prompt=CHAT, extra={"solution": "7"}))  # no level
    core = VerifierWorkerCore(sources={"*": "custom"}, custom_fn=spec, timeout_s=5.0)
    results = core.verify_many(reqs)
    assert [r.score for r in results] == [1.0, 0.0, 0.0, 0.0]
    assert [r.info().get("kind") for r in results] == [None, None, "unscored", "unscored"]
    assert fn.__globals__["CALLS"] == [4]  # one call for the whole chunk


def test_a_failing_batch_is_rescored_per_sample(tmp_path):
    f = tmp_path / "picky.py"
    f.write_text(
        "def reward(prompts, completions, **kw):\n"
        "    if any('boom' in c for c in completions):\n"
        "        raise RuntimeError('boom in ' + repr(completions))\n"
        "    return [1.0] * len(completions)\n"
    )
    core = VerifierWorkerCore(sources={"*": "custom"}, custom_fn=f"{f}:reward", timeout_s=5.0)
    results = core.verify_many([VerifyRequest(u, "x", u, "") for u in ("ok1", "boom", "ok2")])
    assert [r.score for r in results] == [1.0, 0.0, 1.0]
    assert "boom" in results[1].reason and results[1].uid == "boom"


def test_style_forced_and_bad_specs(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def score(a, b, c):\n    return [1.0] * len(b)\n")
    with pytest.raises(ValueError, match="expected verl's"):
        load_custom_fn(f"{f}:score")
    assert load_custom_fn(f"{f}:score", "trl")[1] == "trl"
    with pytest.raises(ValueError, match="custom_style='grpo'"):
        load_custom_fn(f"{f}:score", "grpo")
    with pytest.raises(ValueError, match="no such file"):
        load_custom_fn(str(tmp_path / "nope.py") + ":f")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_custom_fn(f"{f}:nope")
    g = tmp_path / "broken.py"
    g.write_text("import no_such_module_here\n")
    with pytest.raises(ValueError, match="cannot load"):
        load_custom_fn(f"{g}:f")


def test_trls_own_accuracy_reward_runs_unchanged():
    pytest.importorskip("trl")
    reqs = [
        VerifyRequest(u, "x", text, "7", raw_prompt=CHAT, extra={"solution": "$7$"})
        for u, text in (("r", "The answer is $7$."), ("w", "The answer is $8$."))
    ]
    core = VerifierWorkerCore(sources={"*": "custom"}, custom_fn="trl.rewards:accuracy_reward", timeout_s=30)
    assert [r.score for r in core.verify_many(reqs)] == [1.0, 0.0]
