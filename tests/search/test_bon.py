"""Best-of-N selection and its evaluation over nested subsets, with stub samplers and scorers."""

from __future__ import annotations

import pytest

from rlloop.search.bon import Candidate, evaluate_selection, extract_answer, sample_and_score, select


def cand(answer: str | None, values: list[float], correct: float, tokens: int = 10) -> Candidate:
    text = "\n\n".join(["step"] * (len(values) - 1) + [f"so \\boxed{{{answer}}}" if answer else "no answer"])
    return Candidate(
        text=text,
        step_char_ends=list(range(1, len(values) + 1)),
        num_tokens=tokens,
        step_values=values,
        answer=answer,
        correct=correct,
    )


def test_best_of_n_picks_the_argmax_of_each_aggregation():
    cs = [
        cand("1", [0.9, 0.2, 0.6], 0.0),  # last 0.6, min 0.2, mean 0.567, prod 0.108
        cand("2", [0.5, 0.5, 0.5], 1.0),  # last 0.5, min 0.5, mean 0.5,   prod 0.125
        cand("3", [0.4, 0.9, 0.95], 0.0),  # last 0.95, min 0.4, mean 0.75, prod 0.342
        cand("4", [0.6, 0.6], 0.0),  # last 0.6, min 0.6, mean 0.6,  prod 0.36
    ]
    assert select(cs, "bon_last") == 2
    assert select(cs, "bon_min") == 3
    assert select(cs, "bon_mean") == 2
    assert select(cs, "bon_prod") == 3
    cs.append(cand(None, [], 0.0))  # no steps: never chosen over a scored one
    assert select(cs, "bon_min") == 3
    with pytest.raises(ValueError, match="median"):
        select(cs, "bon_median")


def test_evaluate_selection_uses_the_first_n_candidates_of_each_problem():
    problems = [
        # problem 0: first sample right; the PRM prefers a wrong later one; majority of 4 is right
        [cand("7", [0.3], 1.0), cand("7", [0.2], 1.0), cand("9", [0.9], 0.0), cand("8", [0.1], 0.0)],
        # problem 1: first sample wrong; the PRM finds the right one; majority of 4 is wrong ("5" x2)
        [cand("5", [0.4], 0.0), cand("6", [0.8], 1.0), cand("5", [0.3], 0.0), cand("4", [0.1], 0.0)],
    ]
    res = evaluate_selection(
        problems, [1, 4], ["sample", "oracle", "bon_last", "majority", "weighted_majority"]
    )
    assert res["sample"][1]["accuracy"] == pytest.approx(0.5)
    assert res["sample"][4]["accuracy"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert res["oracle"][4]["accuracy"] == 1.0
    assert res["bon_last"][1]["accuracy"] == 0.5  # N = 1: every method takes the first sample
    assert res["majority"][1]["accuracy"] == 0.5
    assert res["bon_last"][4]["accuracy"] == 0.5  # wrong on 0 (0.9 on "9"), right on 1 (0.8 on "6")
    assert res["majority"][4]["accuracy"] == 0.5  # right on 0, wrong on 1
    # weighted: problem 0: "7" 0.5 vs "9" 0.9 -> wrong; problem 1: "5" 0.7 vs "6" 0.8 -> right
    assert res["weighted_majority"][4]["accuracy"] == 0.5
    assert res["sample"][4]["tokens_per_problem"] == 40
    assert res["sample"][1]["tokens_per_problem"] == 10


def test_sample_and_score_fills_values_answers_and_correctness():
    prompts = [
        {"uid": "p0", "prompt_text": "Q0", "ground_truth": "7"},
        {"uid": "p1", "prompt_text": "Q1", "ground_truth": "3"},
    ]
    texts = {"p0": ["a\n\n\\boxed{7}", "b\n\n\\boxed{ 8 }"], "p1": ["\\boxed{3}", "none"]}

    def sample_fn(ps, n):
        assert n == 2
        return [
            [
                Candidate(
                    text=t, step_char_ends=[len(t)] if "\n\n" not in t else [1, len(t)], num_tokens=len(t)
                )
                for t in texts[p["uid"]]
            ]
            for p in ps
        ]

    calls = []

    def score_fn(prompt_texts, response_texts, ends):
        calls.append(list(prompt_texts))
        return [[0.1 * (k + 1) for k in range(len(e))] for e in ends]

    def correct_fn(text, gt, source):
        return float(extract_answer(text) == gt)

    cands, timing = sample_and_score(prompts, 2, sample_fn, score_fn, correct_fn)
    assert calls == [["Q0", "Q0", "Q1", "Q1"]]  # one scoring call for everything, prompts aligned
    assert cands[0][0].step_values == pytest.approx([0.1, 0.2])
    assert [c.answer for c in cands[0]] == ["7", "8"]
    assert [c.correct for cs in cands for c in cs] == [1.0, 0.0, 1.0, 0.0]
    assert cands[1][1].answer is None
    assert set(timing) == {"generate_s", "score_s", "grade_s"}


def test_sample_and_score_rejects_wrong_shapes():
    def short(ps, n):
        return [[Candidate("x", [1], 1)] for _ in ps]

    with pytest.raises(RuntimeError, match="samples"):
        sample_and_score([{"uid": "p"}], 2, short, None, lambda *a: 0.0)
