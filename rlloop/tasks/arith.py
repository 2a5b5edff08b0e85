"""Built-in task `arith`: procedurally generated multi-step arithmetic word problems.

Every problem is a short story ("Sam has 23 marbles. He gets 45 more, then gives away 12. How many
marbles does Sam have now?") whose answer is an integer, with a worked solution in the style the
verifier and the PRM expect: one step per paragraph (steps separated by a blank line) and a final
`\\boxed{}`. Generation is deterministic by seed, so a run is reproducible from its config alone.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlloop.errors import ConfigError
from rlloop.tasks.common import cfg_get, draw_distinct, to_samples
from rlloop.types import Sample

SUPPORTED_OPS = ("+", "-", "*", "/")

_NAMES = (
    ("Sam", "He"),
    ("Ana", "She"),
    ("Leo", "He"),
    ("Mia", "She"),
    ("Tom", "He"),
    ("Zoe", "She"),
    ("Ben", "He"),
    ("Eva", "She"),
    ("Max", "He"),
    ("Ivy", "She"),
)
_ITEMS = ("marbles", "apples", "stickers", "coins", "books", "cards", "shells", "pens")
# One phrase per operation keeps the language regular: a small model should spend its capacity on
# the arithmetic, which is what RL then has to improve.
_PHRASES = {
    "+": "gets {x} more",
    "-": "gives away {x}",
    "*": "ends up with {x} times as many",
    "/": "shares them equally among {x} friends and keeps one share",
}


@dataclass
class ArithProblem:
    question: str
    answer: int
    steps: list[str] = field(default_factory=list)  # worked solution, one string per step


def solution_text(p: ArithProblem) -> str:
    """The worked solution: steps joined by a blank line; the last one ends with `\\boxed{answer}`."""
    return "\n\n".join(p.steps)


def _operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _one_problem(
    rng: random.Random, *, min_ops: int, max_ops: int, min_digits: int, max_digits: int, ops: Sequence[str]
) -> ArithProblem | None:
    """One random problem, or None when the draw breaks a constraint (caller redraws)."""
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    start = _operand(rng, min_digits, max_digits)
    value = start
    phrases, steps = [], [f"{name} starts with {start} {item}."]
    for _ in range(rng.randint(min_ops, max_ops)):
        op = rng.choice(ops)
        if op == "/":
            # exact division only; the divisor must respect the digit knobs and not be 1
            divisors = [
                d
                for d in range(2, value + 1)
                if value % d == 0 and min_digits <= len(str(d)) <= max_digits and d < value
            ]
            if not divisors:
                return None
            x = rng.choice(divisors)
            new = value // x
        else:
            x = _operand(rng, min_digits, max_digits)
            if op == "+":
                new = value + x
            elif op == "-":
                if x > value:  # nobody gives away more than they have; keeps answers >= 0
                    return None
                new = value - x
            else:
                x = max(x, 2)  # "1 times as many" teaches nothing
                new = value * x
        phrases.append(_PHRASES[op].format(x=x))
        steps.append(f"{value} {op} {x} = {new}")
        value = new
    question = (
        f"{name} has {start} {item}. {pronoun} {', then '.join(phrases)}. "
        f"How many {item} does {name} have now?"
    )
    steps.append(f"The answer is \\boxed{{{value}}}.")
    return ArithProblem(question=question, answer=value, steps=steps)


def _check_knobs(min_ops: int, max_ops: int, min_digits: int, max_digits: int, ops: Sequence[str]) -> None:
    if not 1 <= min_ops <= max_ops:
        raise ConfigError(
            f"task.min_ops/max_ops must satisfy 1 <= min_ops <= max_ops, got {min_ops}/{max_ops}"
        )
    if not 1 <= min_digits <= max_digits <= 9:
        raise ConfigError(
            f"task.min_digits/max_digits must satisfy 1 <= min_digits <= max_digits <= 9, got {min_digits}/{max_digits}"
        )
    if not ops:
        raise ConfigError("task.ops is empty; choose from " + ", ".join(SUPPORTED_OPS))
    bad = [op for op in ops if op not in SUPPORTED_OPS]
    if bad:
        raise ConfigError(f"task.ops has unsupported operation(s) {bad}; choose from {list(SUPPORTED_OPS)}")


def generate_problems(
    n: int,
    *,
    seed: int,
    min_ops: int = 1,
    max_ops: int = 2,
    min_digits: int = 1,
    max_digits: int = 2,
    ops: Sequence[str] = ("+", "-"),
    exclude: Collection[str] = (),
) -> list[ArithProblem]:
    """`n` distinct problems (distinct question text), none of whose question is in `exclude`.

    Deterministic in (`n`, `seed`, knobs, `exclude`). Raises ConfigError when the knobs allow fewer
    than `n` distinct problems.
    """
    ops = list(ops)
    _check_knobs(min_ops, max_ops, min_digits, max_digits, ops)
    rng = random.Random(seed)
    return draw_distinct(
        n,
        lambda: _one_problem(
            rng, min_ops=min_ops, max_ops=max_ops, min_digits=min_digits, max_digits=max_digits, ops=ops
        ),
        exclude=exclude,
        what=f"arith problems with ops={ops}, ops {min_ops}-{max_ops}, digits {min_digits}-{max_digits}",
        widen="the knobs",
    )


def knobs(task_cfg: Any) -> dict[str, Any]:
    """The difficulty knobs of a task config as generate_problems keyword arguments."""
    return {
        "min_ops": int(cfg_get(task_cfg, "min_ops", 1)),
        "max_ops": int(cfg_get(task_cfg, "max_ops", 2)),
        "min_digits": int(cfg_get(task_cfg, "min_digits", 1)),
        "max_digits": int(cfg_get(task_cfg, "max_digits", 2)),
        "ops": list(cfg_get(task_cfg, "ops", ("+", "-"))),
    }


def split_problems(task_cfg: Any) -> tuple[list[ArithProblem], list[ArithProblem]]:
    """(train, test) problems; disjoint by question text, deterministic by `task_cfg.seed`.

    The test set is drawn first from its own stream, so it does not change when num_train does.
    """
    seed = int(cfg_get(task_cfg, "seed", 0))
    kw = knobs(task_cfg)
    test = generate_problems(int(cfg_get(task_cfg, "num_test", 200)), seed=2 * seed + 1, **kw)
    train = generate_problems(
        int(cfg_get(task_cfg, "num_train", 20000)), seed=2 * seed, exclude={p.question for p in test}, **kw
    )
    return train, test


def make_splits(task_cfg: Any) -> tuple[list[Sample], list[Sample]]:
    """(train, test) Samples of the arith task; uids `arith-train-{i}` / `arith-test-{i}`."""
    train, test = split_problems(task_cfg)
    return (
        to_samples(train, "train", task_cfg, task="arith", solution_text=solution_text),
        to_samples(test, "test", task_cfg, task="arith", solution_text=solution_text),
    )


def boxed_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (no nested braces), or None.

    A quick local check for the built-in task's own evaluation; the reward path uses the verifiers.
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    end = text.find("}", start)
    return None if end < 0 else text[start + len("\\boxed{") : end].strip()


def is_well_formed(text: str, delimiter: str = "\n\n") -> bool:
    """At least two steps (separated by `delimiter`) and a final step with a `\\boxed{}` answer."""
    steps = [s for s in text.split(delimiter) if s.strip()]
    return len(steps) >= 2 and boxed_answer(steps[-1]) is not None


def sft_corpus(task_cfg: Any, exclude: Collection[str] = ()) -> list[Sample]:
    """Pretraining examples: the training split with its worked solutions (`extra["solution"]`); the
    test split is never among them."""
    return make_splits(task_cfg)[0]
