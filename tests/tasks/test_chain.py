"""The built-in `chain` task: facts, misconceptions, the teacher corpus and the exact step checker."""

from __future__ import annotations

import random

import pytest

from rlloop.errors import ConfigError
from rlloop.tasks import chain

CFG = {
    "name": "chain",
    "seed": 0,
    "num_train": 3000,
    "num_test": 200,
    "min_ops": 3,
    "max_ops": 6,
    "heldout_fact_frac": 0.1,
}


def test_facts_are_all_in_range_steps():
    assert len(chain.FACTS) == 270
    for a, op, b in chain.FACTS:
        assert 0 <= a <= 19 and 1 <= b <= 9 and 0 <= chain.apply(a, op, b) <= 19


def test_misconceptions_are_a_quarter_of_facts_with_wide_offsets():
    wrong = chain.misconceptions(seed=0)
    assert len(wrong) == round(0.25 * 270)
    offsets = {c - chain.apply(*f) for f, c in wrong.items()}
    assert 0 not in offsets and all(-6 <= d <= 6 for d in offsets)
    assert any(abs(d) > 2 for d in offsets), "wrong results must not all be near misses"
    assert all(0 <= c <= 19 for c in wrong.values())
    assert chain.misconceptions(seed=0) == wrong and chain.misconceptions(seed=1) != wrong


def test_every_step_of_a_generated_correct_solution_verifies():
    for p in chain.generate_problems(300, seed=3):
        text = chain.solution_text(p)
        assert chain.first_error(p, text) == -1
        steps = chain.split_steps(text)
        assert len(steps) == p.num_steps == len(p.ops) + 1
        vals = p.values()
        for k, (op, b) in enumerate(p.ops):
            assert steps[k] == f"{vals[k]}{op}{b}={vals[k + 1]}"
            assert 0 <= vals[k + 1] <= 19
        assert steps[-1] == f"\\boxed{{{p.answer}}}"
        assert chain.parse_question(p.question) == p


def test_first_error_finds_the_corrupted_step():
    rng = random.Random(0)
    for p in chain.generate_problems(200, seed=4):
        K = len(p.ops)
        k = rng.randrange(K)
        results = p.values()[1:]
        results[k] += rng.choice([-3, -1, 1, 2])
        # later steps carry on correctly from the wrong value, as a model would
        for j in range(k + 1, K):
            op, b = p.ops[j]
            results[j] = chain.apply(results[j - 1], op, b)
        assert chain.first_error(p, chain.format_solution(p.start, p.ops, results)) == k


def test_first_error_edge_cases():
    p = chain.parse_question("7+5-3")
    assert chain.first_error(p, "7+5=12\n\n12-3=9\n\n\\boxed{9}") == -1
    assert chain.first_error(p, " 7 + 5 = 12 \n\n12 - 3 = 9\n\n\\boxed{ 9 }") == -1  # spaces are fine
    assert chain.first_error(p, "7+5=12\n\n12-3=9") == 2  # no answer step
    assert chain.first_error(p, "7+5=12\n\n12-3=9\n\n\\boxed{8}") == 2  # wrong answer after right steps
    assert chain.first_error(p, "7+5=12\n\n\\boxed{9}") == 1  # a step skipped
    assert chain.first_error(p, "7+5=12\n\n12+3=15\n\n\\boxed{15}") == 1  # the wrong operation
    assert chain.first_error(p, "7+5=12\n\n12-3=9\n\n\\boxed{9}\n\n9+1=10") == 3  # trailing step
    assert chain.first_error(p, "") == 0
    assert chain.first_error(p, "7+5=1�2\n\n12-3=9\n\n\\boxed{9}") == 0  # garbled


def test_teacher_errors_are_exactly_its_misconceptions():
    wrong = chain.misconceptions(seed=0)
    rng = random.Random(1)
    n_wrong = 0
    for p in chain.generate_problems(500, seed=5):
        text = chain.teacher_solution(p, wrong, error_p=0.6, rng=rng)
        k = chain.first_error(p, text)
        facts = p.facts()
        if k == -1:
            continue
        n_wrong += 1
        assert facts[k] in wrong, "the teacher only errs on misconception facts"
        assert chain.split_steps(text)[k].endswith(f"={wrong[facts[k]]}")
        assert all(f not in wrong or True for f in facts[:k])
    assert n_wrong > 100
    # with error_p = 0 the teacher is always right
    assert all(
        chain.first_error(p, chain.teacher_solution(p, wrong, 0.0, rng)) == -1
        for p in chain.generate_problems(100, seed=6)
    )


def test_splits_are_disjoint_and_train_avoids_heldout_facts():
    train, test = chain.split_problems(CFG)
    assert len(train) == 3000 and len(test) == 200
    assert not {p.question for p in train} & {p.question for p in test}
    held = chain.heldout_facts(CFG)
    wrong = chain.task_misconceptions(CFG)
    assert held and held <= set(wrong) and len(held) == round(0.1 * len(wrong))
    assert all(not set(p.facts()) & held for p in train)
    assert any(set(p.facts()) & held for p in test), "the test set still probes the held-out facts"
    assert all(3 <= len(p.ops) <= 6 for p in train + test)
    # the test split does not move with num_train
    assert chain.split_problems({**CFG, "num_train": 100})[1] == test


def test_samples_and_corpus():
    train, test = chain.make_splits(CFG)
    s = test[0]
    assert s.uid == "chain-test-0" and s.data_source == "chain"
    p = chain.parse_question(s.prompt)
    assert s.ground_truth == str(p.answer) and s.extra["solution"] == chain.solution_text(p)
    corpus = chain.sft_corpus({**CFG, "corpus_size": 500}, exclude={t.prompt for t in test})
    assert len(corpus) == 500 and not {c.prompt for c in corpus} & {t.prompt for t in test}
    wrong_rate = sum(chain.first_error(chain.parse_question(c.prompt), c.extra["solution"]) >= 0 for c in corpus)
    assert 0.3 < wrong_rate / 500 < 0.7  # the teacher is wrong on about half the chains


def test_bad_knobs_are_config_errors():
    with pytest.raises(ConfigError, match="min_ops"):
        chain.generate_problems(5, seed=0, min_ops=4, max_ops=3)
    with pytest.raises(ConfigError, match="misconception_frac"):
        chain.misconceptions(0, frac=1.5)
    with pytest.raises(ConfigError, match="heldout_fact_frac"):
        chain.heldout_facts({**CFG, "heldout_fact_frac": 1.0})


def test_math_verifier_scores_chain_solutions():
    from rlloop.rewards.verifiers.base import VerifyRequest, get_verifier

    verify = get_verifier("math")

    def score(text: str) -> float:
        return verify(VerifyRequest(uid="u", data_source="chain", solution_str=text, ground_truth="9")).score

    assert score("7+5=12\n\n12-3=9\n\n\\boxed{9}") == 1.0
    assert score("7+5=12\n\n12-3=8\n\n\\boxed{8}") == 0.0
