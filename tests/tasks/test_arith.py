import re

import pytest

from rlloop.config import TaskConfig
from rlloop.errors import ConfigError
from rlloop.tasks.arith import generate_problems, make_splits, solution_text


def _boxed(text: str) -> str:
    # a deliberately independent parse (not the verifier, not arith.boxed_answer)
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    assert len(found) == 1, text
    return found[0]


def _operands(question: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", question)]


def test_same_seed_same_problems_other_seed_differs():
    a = generate_problems(50, seed=3)
    b = generate_problems(50, seed=3)
    c = generate_problems(50, seed=4)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in a] != [p.question for p in c]


def test_splits_deterministic_disjoint_and_sized():
    cfg = TaskConfig(num_train=500, num_test=100, seed=7)
    tr1, te1 = make_splits(cfg)
    tr2, te2 = make_splits(cfg)
    assert [s.prompt for s in tr1] == [s.prompt for s in tr2]
    assert [s.prompt for s in te1] == [s.prompt for s in te2]
    assert len(tr1) == 500 and len(te1) == 100
    assert not {s.prompt for s in tr1} & {s.prompt for s in te1}
    assert len({s.prompt for s in tr1}) == 500
    assert tr1[0].uid == "arith-train-0" and te1[99].uid == "arith-test-99"
    assert all(s.data_source == "arith" for s in tr1 + te1)


def test_test_split_does_not_depend_on_num_train():
    _, te_small = make_splits(TaskConfig(num_train=10, num_test=50))
    _, te_big = make_splits(TaskConfig(num_train=800, num_test=50))
    assert [s.prompt for s in te_small] == [s.prompt for s in te_big]


@pytest.mark.parametrize(
    "knobs",
    [
        dict(min_ops=1, max_ops=1, min_digits=1, max_digits=1, ops=("+",)),
        dict(min_ops=3, max_ops=3, min_digits=2, max_digits=2, ops=("+", "-")),
        dict(min_ops=1, max_ops=2, min_digits=1, max_digits=3, ops=("*",)),
        dict(min_ops=2, max_ops=2, min_digits=1, max_digits=2, ops=("+", "/")),
    ],
)
def test_knobs_respected_and_boxed_answer_is_ground_truth(knobs):
    probs = generate_problems(200, seed=1, **knobs)
    for p in probs:
        sol = solution_text(p)
        steps = sol.split("\n\n")
        assert _boxed(steps[-1]) == str(p.answer)
        equations = [s for s in steps if "=" in s]
        assert knobs["min_ops"] <= len(equations) <= knobs["max_ops"]
        value = _operands(p.question)[0]
        for eq in equations:  # replay every step: the chain of equations must be right
            m = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", eq)
            assert m, eq
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert a == value and op in knobs["ops"]
            assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else -1}[op]
            if op == "/":
                assert a % b == 0
            assert knobs["min_digits"] <= len(str(b)) <= knobs["max_digits"], eq
            value = c
        assert value == p.answer and p.answer >= 0
        assert knobs["min_digits"] <= len(str(_operands(p.question)[0])) <= knobs["max_digits"]


def test_sample_carries_solution_and_template():
    cfg = TaskConfig(num_train=5, num_test=5, prompt_template="Solve: {question} Answer in \\boxed{}.")
    tr, _ = make_splits(cfg)
    s = tr[0]
    assert s.prompt.startswith("Solve: ") and s.prompt.endswith("Answer in \\boxed{}.")
    assert _boxed(s.extra["solution"]) == s.ground_truth


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(ops=("^",)), "task.ops"),
        (dict(ops=()), "task.ops"),
        (dict(min_ops=3, max_ops=2), "min_ops"),
        (dict(min_digits=0), "min_digits"),
    ],
)
def test_bad_knobs_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        generate_problems(5, seed=0, **bad)


def test_too_many_problems_for_the_knobs_is_a_clear_error():
    with pytest.raises(ConfigError, match="distinct"):
        generate_problems(100_000, seed=0, min_ops=1, max_ops=1, min_digits=1, max_digits=1, ops=("+",))
