"""RolloutWorkerCore: Rollout objects with uids, versions, decoded text and step boundaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlloop.rollout.steps import split_steps
from rlloop.rollout.worker import RolloutWorkerCore
from rlloop.types import Rollout


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    torch.set_num_threads(1)
    return RolloutWorkerCore(tiny_model_dir, seed=0)


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def common_prefix_len(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def make_prompts(tokenizer):
    texts = {"q1": "Compute 12 + 30.\n\n", "q2": "Step one.\n\nThe"}
    return [
        {
            "uid": uid,
            "prompt_ids": tokenizer(t, add_special_tokens=False)["input_ids"],
            "prompt_text": t,
            "data_source": "arith",
            "ground_truth": "42",
        }
        for uid, t in texts.items()
    ]


def test_generate_returns_rollouts_with_steps(worker, bpe_tokenizer):
    prompts = make_prompts(bpe_tokenizer)
    rollouts = worker.generate(prompts, n=3, max_new_tokens=40, temperature=1.0, seed=0)
    assert len(rollouts) == 6 and all(isinstance(r, Rollout) for r in rollouts)
    assert [r.uid for r in rollouts] == ["q1/0", "q1/1", "q1/2", "q2/0", "q2/1", "q2/2"]
    assert [r.group for r in rollouts] == ["q1"] * 3 + ["q2"] * 3
    saw_multi_step = False
    for r in rollouts:
        p = prompts[0] if r.group == "q1" else prompts[1]
        assert r.prompt_ids == p["prompt_ids"] and r.prompt_text == p["prompt_text"]
        assert (r.data_source, r.ground_truth, r.policy_version) == ("arith", "42", 0)
        assert len(r.rollout_logprobs) == len(r.response_ids) <= 40
        assert r.text == bpe_tokenizer.decode(r.response_ids, skip_special_tokens=True)
        spans = split_steps(r.text)
        assert r.step_char_ends == [e for _, e in spans]
        assert len(r.step_ends) == len(r.step_char_ends)
        assert r.step_ends == sorted(r.step_ends) and all(0 <= t < len(r.response_ids) for t in r.step_ends)
        for t, c in zip(r.step_ends, r.step_char_ends, strict=True):
            # the step's last character is decoded by token t and not before it (random babble holds
            # invalid UTF-8, so compare decoded prefixes with the final text rather than by length)
            upto = common_prefix_len(decode(bpe_tokenizer, r.response_ids[: t + 1]), r.text)
            before = common_prefix_len(decode(bpe_tokenizer, r.response_ids[:t]), r.text)
            assert upto >= c > before, r.uid
        saw_multi_step |= len(r.step_ends) > 1
    # the tiny random model babbles over a vocabulary rich in "\n\n" merges; 6 x 40 tokens give steps
    assert saw_multi_step


def test_custom_step_regex(tiny_model_dir, bpe_tokenizer):
    worker = RolloutWorkerCore(tiny_model_dir, step_regex=r"\s")  # every whitespace run ends a step
    rollouts = worker.generate(
        make_prompts(bpe_tokenizer)[:1], n=2, max_new_tokens=30, temperature=1.0, seed=1
    )
    for r in rollouts:
        assert r.step_char_ends == [e for _, e in split_steps(r.text, regex=r"\s")]
        assert all(not r.text[e - 1].isspace() for e in r.step_char_ends)


def test_update_weights_bumps_policy_version(worker, bpe_tokenizer, make_tiny_llama):
    prompts = make_prompts(bpe_tokenizer)
    before = worker.generate(prompts, n=1, max_new_tokens=8, temperature=0.0)
    arrays = {k: v.detach().numpy() for k, v in make_tiny_llama(bpe_tokenizer, seed=9).state_dict().items()}
    assert worker.update_weights(arrays, version=3) == 3
    assert worker.policy_version == worker.get_policy_version() == 3
    after = worker.generate(prompts, n=1, max_new_tokens=8, temperature=0.0)
    assert all(r.policy_version == 3 for r in after)
    assert [r.response_ids for r in before] != [r.response_ids for r in after]
    np.testing.assert_array_equal(
        worker.engine.model.lm_head.weight.detach().numpy(), arrays["lm_head.weight"]
    )


def test_missing_prompt_ids_names_the_uid(worker):
    with pytest.raises(KeyError, match="q9"):
        worker.generate([{"uid": "q9", "prompt_text": "x"}], n=1, max_new_tokens=2, temperature=1.0)


def test_unknown_engine_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="'vllm2'"):
        RolloutWorkerCore(tiny_model_dir, engine="vllm2")
