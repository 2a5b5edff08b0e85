"""rlloop.experiments.prm_vstar: the teacher's exact value function, by hand and against sampling."""

from __future__ import annotations

import math

import pytest

from rlloop.experiments.prm_quality import teacher_prompt_outcomes
from rlloop.experiments.prm_vstar import exact_values, success_probability
from rlloop.tasks import chain


def test_success_probability_by_hand_counts_compensating_errors():
    ops = [("+", 5), ("-", 3)]  # 7 + 5 = 12, 12 - 3 = 9
    wrong = {(7, "+", 5): 13}  # the teacher writes 13 with probability 0.7
    assert success_probability(7, ops, 9, wrong, 0.7) == pytest.approx(0.3)
    # from 13 a second misconception 13 - 3 = 9 can compensate: 0.3 + 0.7 * 0.7
    wrong[(13, "-", 3)] = 9
    assert success_probability(7, ops, 9, wrong, 0.7) == pytest.approx(0.79)
    # exact values of a written solution: after the wrong 13 the chain still ends right with p 0.7
    row = {"question": "7+5-3", "written": [13, 9], "step_char_ends": [6, 13, 23], "correct": 1.0}
    v0, values = exact_values(row, wrong, 0.7)
    assert v0 == pytest.approx(0.79) and values == pytest.approx([0.7, 1.0, 1.0])


def test_exact_value_of_the_prompt_matches_teacher_sampling():
    cfg = {"seed": 0, "min_ops": 12, "max_ops": 16, "misconception_frac": 0.3, "max_offset": 6, "teacher_error_p": 0.7}
    wrong = chain.task_misconceptions(cfg)
    questions = ["3+9-6+5-5+6-6+8+2-7-2-6+5-6+5-1", "7+5-3+8-6+2+1-4-3+9-5+2"]
    m = 4000
    sampled = teacher_prompt_outcomes([{"question": q} for q in questions], m=m, seed=0, task_cfg=cfg)
    for q, outcomes in zip(questions, sampled, strict=True):
        p = chain.parse_question(q)
        exact = success_probability(p.start, p.ops, p.answer, wrong, 0.7)
        se = math.sqrt(max(exact * (1 - exact), 1e-4) / m)
        assert abs(sum(outcomes) / m - exact) < 4 * se
