"""The search worker on tiny local models: whole solutions as candidates, and generation step by step."""

from __future__ import annotations

import pytest
import torch

from rlloop.search.beam import StepBeamSearch, StepRequest
from rlloop.search.worker import SearchWorkerCore, first_step_end

from .conftest import PROMPT, SOLUTION, STEPS


@pytest.mark.parametrize(
    "text, end",
    [
        ("We add 3.\n\nThe", 11),
        ("\n\nWe add 3.\n\nThe", 13),  # a delimiter before any visible text ends no step
        ("  \n\n", None),
        ("no step yet", None),
        ("a\n\n\n\nb", 3),
    ],
)
def test_first_step_end(text, end):
    assert first_step_end(text) == end


def test_first_step_end_with_regex():
    assert first_step_end("x;\ny;\n", regex=r";\n") == 3


@pytest.fixture(scope="module")
def memorised_worker(memorised_policy_dir):
    torch.set_num_threads(1)
    return SearchWorkerCore(memorised_policy_dir, num_threads=1)


def _prompt(worker) -> dict:
    ids = worker.tokenizer(PROMPT)["input_ids"]
    return {"uid": "q", "prompt_ids": ids, "prompt_text": PROMPT, "ground_truth": "7", "data_source": "arith"}


def test_the_memorised_model_reproduces_its_solution(memorised_worker):
    (cands,) = memorised_worker.sample([_prompt(memorised_worker)], 1, max_new_tokens=40, temperature=0.0)
    assert cands[0].text == SOLUTION
    assert cands[0].finish_reason == "stop"
    assert len(cands[0].step_char_ends) == 3


def test_steps_stop_at_the_delimiter_and_continue_from_the_kept_text(memorised_worker):
    worker = memorised_worker
    prompt = _prompt(worker)
    (outs,) = worker.generate_steps([StepRequest(prompt, [], "")], 2, max_step_tokens=30, temperature=0.0)
    for out in outs:
        assert out.text == STEPS[0] and out.finish_reason == "step"
        assert worker.tokenizer.decode(out.response_ids, skip_special_tokens=True) == STEPS[0]
        assert 0 < out.num_tokens < 30
    # the token ".\n\nThe sum is " spans the boundary; the cutter keeps only step 1's characters
    merged = [worker.tokenizer.decode([t]) for t in worker.tokenizer(SOLUTION)["input_ids"]]
    assert any("\n\n" in t and t.strip(".\n") for t in merged), merged
    (outs,) = worker.generate_steps(
        [StepRequest(prompt, outs[0].response_ids, STEPS[0])], 1, max_step_tokens=30, temperature=0.0
    )
    assert outs[0].text == STEPS[1]
    assert (
        outs[0].response_ids[: len(worker.tokenizer(STEPS[0])["input_ids"])]
        == worker.tokenizer(STEPS[0])["input_ids"]
    )


def test_greedy_step_search_rebuilds_the_solution(memorised_worker):
    worker = memorised_worker

    def steps(requests, n):
        return worker.generate_steps(requests, n, max_step_tokens=30, temperature=0.0)

    def score(prompt_texts, texts, ends):
        return [[0.5] * len(e) for e in ends]

    (res,) = StepBeamSearch(steps, score, top_k=1, num_branch=1, max_depth=6).run([_prompt(worker)])
    assert res.best.text == SOLUTION
    assert res.finished and res.depth == 3
    assert res.best.step_char_ends == [len(STEPS[0]) - 2, len(STEPS[0]) + len(STEPS[1]) - 2, len(SOLUTION)]


def test_sampled_steps_on_a_random_model_keep_their_invariants(random_policy_dir):
    torch.set_num_threads(1)
    worker = SearchWorkerCore(random_policy_dir, num_threads=1, max_batch_size=5)
    prompt = {"uid": "r", "prompt_ids": worker.tokenizer(PROMPT)["input_ids"], "prompt_text": PROMPT}
    prefix = worker.tokenizer(STEPS[0])["input_ids"]
    requests = [StepRequest(prompt, [], ""), StepRequest(prompt, prefix, STEPS[0])]
    outs = worker.generate_steps(requests, 4, max_step_tokens=12, temperature=1.0, seed=3)
    assert [len(o) for o in outs] == [4, 4]
    for req, row in zip(requests, outs, strict=True):
        for out in row:
            assert out.response_ids[: len(req.response_ids)] == list(req.response_ids)
            assert 1 <= out.num_tokens <= 12
            assert out.finish_reason in ("step", "stop", "length")
            if out.finish_reason == "step":
                assert out.text.endswith("\n\n") and first_step_end(out.text) == len(out.text)
            else:
                assert first_step_end(out.text) is None
    again = worker.generate_steps(requests, 4, max_step_tokens=12, temperature=1.0, seed=3)
    assert [[o.text for o in row] for row in again] == [[o.text for o in row] for row in outs]
    cands = worker.sample([prompt, prompt], 3, max_new_tokens=8, temperature=1.0, seed=1)
    assert [len(c) for c in cands] == [3, 3]
    assert all(1 <= c.num_tokens <= 8 for cs in cands for c in cs)
