"""Built-in task `chain`: running sums like `7+5-3+8-6`, solved one step per paragraph.

Why this task exists (docs/results.md, "The chain testbed"): RL on real LLMs works because the
pretrained model already gives some probability to correct solutions it does not prefer, and a process
reward helps when a solution is long and its first wrong step is a small part of it. `chain` builds both
properties in, with the ground truth of every step known exactly:

- **Facts.** Every step applies one *fact* `a op b = c` with a, c in 0..19, b in 1..9 and op in {+, -}:
  270 facts in all (`FACTS`). A prompt is a chain of `min_ops..max_ops` operations whose running value
  stays in 0..19, so every step of a correct solution is one of these facts.
- **Misconceptions.** A fixed random share (`misconception_frac`, 25 %) of the facts has a wrong result
  (`misconceptions`): the right one plus an offset drawn from +-1..+-`max_offset` (6), kept in 0..19.
  Offsets are drawn per fact from a wide range on purpose: RL cannot fix them all by learning one shared
  "avoid the near miss" direction, it has to learn each fact (the `chain_facts` experiment measures
  accuracy on misconception facts that the RL prompts never use).
- **Teacher corpus.** The pretraining corpus (`teacher_solution`) is written by a teacher that holds
  the misconceptions and writes the wrong result of such a fact with probability `teacher_error_p` (0.6)
  each time it uses it, then carries on correctly from the value it wrote. A model pretrained on it
  prefers the wrong result of some facts (greedy accuracy well below 1) while still sampling the right
  one often (pass@8 near 1): the room RL is meant to use.
- **Exact step labels.** `first_error` returns the index of the first wrong step of any solution text
  (ProcessBench's convention: -1 when every step is right). It is ground truth for *evaluating* PRMs and
  for the oracle-PRM arm; no learned PRM is trained on it.

Solution format (the verifier's and the PRM's): one step per paragraph (steps separated by a blank line),
each `a+b=c`, then a last step `\\boxed{answer}`. Everything is deterministic by seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from rlloop.errors import ConfigError
from rlloop.tasks.common import cfg_get, draw_distinct, to_sample, to_samples
from rlloop.types import Sample

MAX_VALUE = 19  # running values (and fact operands and results) stay in 0..MAX_VALUE
MAX_OPERAND = 9  # the second operand of a fact: 1..MAX_OPERAND
STEP_DELIMITER = "\n\n"
_STEP = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(\d+)\s*=\s*(-?\d+)\s*$")
_BOXED = re.compile(r"^\s*\\boxed\{\s*(-?\d+)\s*\}\s*$")

Fact = tuple[int, str, int]  # (a, op, b): the fact a op b


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def _all_facts() -> tuple[Fact, ...]:
    return tuple(
        (a, op, b)
        for op in ("+", "-")
        for b in range(1, MAX_OPERAND + 1)
        for a in range(MAX_VALUE + 1)
        if 0 <= apply(a, op, b) <= MAX_VALUE
    )


FACTS: tuple[Fact, ...] = _all_facts()  # 270 facts
# the operations allowed from each running value, in the order the generator draws from
_MOVES = {
    a: [(op, b) for op in "+-" for b in range(1, MAX_OPERAND + 1) if 0 <= apply(a, op, b) <= MAX_VALUE]
    for a in range(MAX_VALUE + 1)
}


def misconceptions(seed: int, frac: float = 0.25, max_offset: int = 6) -> dict[Fact, int]:
    """{fact: the wrong result the teacher holds}: a fixed random `frac` of FACTS, deterministic by seed.

    The wrong result is the right one plus an offset in +-1..+-max_offset, drawn uniformly among those
    that keep it in 0..MAX_VALUE.
    """
    if not 0.0 <= frac <= 1.0:
        raise ConfigError(f"task.misconception_frac must be in [0, 1], got {frac}")
    if max_offset < 1:
        raise ConfigError(f"task.max_offset must be >= 1, got {max_offset}")
    rng = random.Random(f"chain-misconceptions-{seed}")
    chosen = rng.sample(FACTS, round(frac * len(FACTS)))
    out: dict[Fact, int] = {}
    for fact in sorted(chosen):
        right = apply(*fact)
        wrong = [right + d for d in range(-max_offset, max_offset + 1) if d and 0 <= right + d <= MAX_VALUE]
        out[fact] = rng.choice(wrong)
    return out


@dataclass(frozen=True)
class ChainProblem:
    start: int
    ops: tuple[tuple[str, int], ...]  # (op, operand) per step

    @property
    def question(self) -> str:
        return str(self.start) + "".join(f"{op}{b}" for op, b in self.ops)

    def values(self) -> list[int]:
        """The running values v_0 = start, v_1, ..., v_K of the correct solution."""
        vals = [self.start]
        for op, b in self.ops:
            vals.append(apply(vals[-1], op, b))
        return vals

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def facts(self) -> list[Fact]:
        """The fact each step of the correct solution uses."""
        vals = self.values()
        return [(vals[k], op, b) for k, (op, b) in enumerate(self.ops)]

    @property
    def num_steps(self) -> int:
        """Steps of a full solution: one per operation plus the answer step."""
        return len(self.ops) + 1


def format_solution(start: int, ops: Sequence[tuple[str, int]], results: Sequence[int]) -> str:
    """`a+b=c` per step from the written results (each step starts from the previous written result),
    then `\\boxed{last}`, steps joined by a blank line."""
    steps, a = [], start
    for (op, b), c in zip(ops, results, strict=True):
        steps.append(f"{a}{op}{b}={c}")
        a = c
    steps.append(f"\\boxed{{{a}}}")
    return STEP_DELIMITER.join(steps)


def solution_text(p: ChainProblem) -> str:
    """The correct worked solution."""
    return format_solution(p.start, p.ops, p.values()[1:])


def teacher_values(
    start: int, ops: Sequence[tuple[str, int]], wrong: dict[Fact, int], error_p: float, rng: random.Random
) -> list[int]:
    """The results the misconception teacher writes, one per operation, from running value `start`: each
    step uses the fact (written value, op, b); for a misconception fact it writes the wrong result with
    probability `error_p`, and it always carries on from what it wrote (correct arithmetic from there,
    even outside 0..MAX_VALUE)."""
    a, results = start, []
    for op, b in ops:
        fact = (a, op, b)
        a = wrong[fact] if fact in wrong and rng.random() < error_p else apply(a, op, b)
        results.append(a)
    return results


def teacher_solution(p: ChainProblem, wrong: dict[Fact, int], error_p: float, rng: random.Random) -> str:
    """A solution written by the misconception teacher (`teacher_values`)."""
    return format_solution(p.start, p.ops, teacher_values(p.start, p.ops, wrong, error_p, rng))


def split_steps(text: str) -> list[str]:
    return [s.strip() for s in text.split(STEP_DELIMITER) if s.strip()]


def first_error(p: ChainProblem, text: str) -> int:
    """Index of the first wrong step of `text` as a solution of `p`, or -1 when every step is right.

    Step k < K (K operations) is right when it reads `v_k op_k b_k = v_{k+1}` (spaces allowed) with the
    correct running values; step K must be `\\boxed{v_K}` and the last step. A missing step is wrong at
    its index; any step after the boxed answer makes step K + 1 wrong.
    """
    steps = split_steps(text)
    vals = p.values()
    for k, (op, b) in enumerate(p.ops):
        if k >= len(steps):
            return k
        m = _STEP.match(steps[k])
        if m is None or (int(m[1]), m[2], int(m[3]), int(m[4])) != (vals[k], op, b, vals[k + 1]):
            return k
    K = len(p.ops)
    if K >= len(steps):
        return K
    m = _BOXED.match(steps[K])
    if m is None or int(m[1]) != vals[K]:
        return K
    return -1 if len(steps) == K + 1 else K + 1


def step_facts_written(p: ChainProblem, text: str) -> list[tuple[Fact, bool]]:
    """For each step of `text` that starts from the correct running value and applies the right
    operation: (the fact it applies, whether its written result is right). Stops at the first step that
    does not (later steps start from a wrong value or are garbled). For per-fact accuracy."""
    out = []
    steps = split_steps(text)
    vals = p.values()
    for k, (op, b) in enumerate(p.ops):
        if k >= len(steps):
            break
        m = _STEP.match(steps[k])
        if m is None or (int(m[1]), m[2], int(m[3])) != (vals[k], op, b):
            break
        right = int(m[4]) == vals[k + 1]
        out.append(((vals[k], op, b), right))
        if not right:
            break
    return out


def _one_problem(rng: random.Random, min_ops: int, max_ops: int, banned: Collection[Fact]) -> ChainProblem:
    """A random chain whose running value stays in 0..MAX_VALUE and that uses no `banned` fact (it may
    come out shorter than min_ops when no operation is allowed; the caller redraws)."""
    start = a = rng.randint(1, MAX_OPERAND)
    ops = []
    for _ in range(rng.randint(min_ops, max_ops)):
        choices = _MOVES[a] if not banned else [(op, b) for op, b in _MOVES[a] if (a, op, b) not in banned]
        if not choices:
            break
        op, b = rng.choice(choices)
        ops.append((op, b))
        a = apply(a, op, b)
    return ChainProblem(start=start, ops=tuple(ops))


def generate_problems(
    n: int,
    *,
    seed: Any,
    min_ops: int = 3,
    max_ops: int = 6,
    exclude: Collection[str] = (),
    banned_facts: Collection[Fact] = (),
) -> list[ChainProblem]:
    """`n` distinct chains (by question text) with min_ops..max_ops steps, none in `exclude`, none
    using a fact in `banned_facts`. Deterministic in its arguments."""
    if not 1 <= min_ops <= max_ops:
        raise ConfigError(f"task.min_ops/max_ops must satisfy 1 <= min_ops <= max_ops, got {min_ops}/{max_ops}")
    rng = random.Random(f"chain-problems-{seed}")
    banned = set(banned_facts)

    def draw() -> ChainProblem | None:
        p = _one_problem(rng, min_ops, max_ops, banned)
        return p if len(p.ops) >= min_ops else None  # cut short by the banned facts

    return draw_distinct(
        n,
        draw,
        exclude=exclude,
        what=f"chain problems with {min_ops}-{max_ops} operations",
        widen="min_ops/max_ops",
    )


def knobs(task_cfg: Any) -> dict[str, Any]:
    """What in a chain task config changes its pretraining corpus or its held-out problems (the cache
    key of the model pretrained on it; `heldout_fact_frac` only filters the RL training prompts)."""
    return {
        "min_ops": int(cfg_get(task_cfg, "min_ops", 3)),
        "max_ops": int(cfg_get(task_cfg, "max_ops", 6)),
        "misconception_frac": float(cfg_get(task_cfg, "misconception_frac", 0.25)),
        "max_offset": int(cfg_get(task_cfg, "max_offset", 6)),
        "teacher_error_p": float(cfg_get(task_cfg, "teacher_error_p", 0.6)),
        "corpus_size": int(cfg_get(task_cfg, "corpus_size", 60000)),
    }


def task_misconceptions(task_cfg: Any) -> dict[Fact, int]:
    k = knobs(task_cfg)
    return misconceptions(int(cfg_get(task_cfg, "seed", 0)), k["misconception_frac"], k["max_offset"])


def heldout_facts(task_cfg: Any) -> set[Fact]:
    """Misconception facts that no RL training prompt uses (`task.heldout_fact_frac` of them): RL can
    only fix them by a change that is not specific to the facts it practises."""
    frac = float(cfg_get(task_cfg, "heldout_fact_frac", 0.0))
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"task.heldout_fact_frac must be in [0, 1), got {frac}")
    wrong = sorted(task_misconceptions(task_cfg))
    rng = random.Random(f"chain-heldout-{cfg_get(task_cfg, 'seed', 0)}")
    return set(rng.sample(wrong, round(frac * len(wrong))))


def split_problems(task_cfg: Any) -> tuple[list[ChainProblem], list[ChainProblem]]:
    """(train, test): disjoint by question; train prompts avoid the held-out facts, test ones do not.

    The test set is drawn first from its own stream, so it does not change when num_train does.
    """
    seed = int(cfg_get(task_cfg, "seed", 0))
    k = knobs(task_cfg)
    test = generate_problems(
        int(cfg_get(task_cfg, "num_test", 200)),
        seed=f"{seed}-test",
        min_ops=k["min_ops"],
        max_ops=k["max_ops"],
    )
    train = generate_problems(
        int(cfg_get(task_cfg, "num_train", 20000)),
        seed=f"{seed}-train",
        min_ops=k["min_ops"],
        max_ops=k["max_ops"],
        exclude={p.question for p in test},
        banned_facts=heldout_facts(task_cfg),
    )
    return train, test


def pretraining_corpus(task_cfg: Any, n: int, exclude: Collection[str]) -> list[tuple[ChainProblem, str]]:
    """`n` (problem, teacher solution) pairs for pretraining, from their own stream (held-out facts
    included: the model must hold every misconception), never a question in `exclude`."""
    seed = int(cfg_get(task_cfg, "seed", 0))
    k = knobs(task_cfg)
    probs = generate_problems(
        n, seed=f"{seed}-corpus", min_ops=k["min_ops"], max_ops=k["max_ops"], exclude=exclude
    )
    wrong = task_misconceptions(task_cfg)
    rng = random.Random(f"chain-teacher-{seed}")
    return [(p, teacher_solution(p, wrong, k["teacher_error_p"], rng)) for p in probs]


def make_splits(task_cfg: Any) -> tuple[list[Sample], list[Sample]]:
    """(train, test) Samples; uids `chain-train-{i}` / `chain-test-{i}`."""
    train, test = split_problems(task_cfg)
    return (
        to_samples(train, "train", task_cfg, task="chain", solution_text=solution_text),
        to_samples(test, "test", task_cfg, task="chain", solution_text=solution_text),
    )


def parse_question(question: str) -> ChainProblem:
    """The ChainProblem of a question text such as `7+5-3` (inverse of ChainProblem.question)."""
    m = re.fullmatch(r"\s*(\d+)((?:\s*[+-]\s*\d+)+)\s*", question)
    if m is None:
        raise ValueError(f"not a chain question: {question!r}")
    ops = tuple((op, int(b)) for op, b in re.findall(r"([+-])\s*(\d+)", m[2]))
    return ChainProblem(start=int(m[1]), ops=ops)


def sft_corpus(task_cfg: Any, exclude: Collection[str] = ()) -> list[Sample]:
    """Pretraining examples (`task.corpus_size` of them): chains with the misconception teacher's
    solutions in `extra["solution"]`; no question in `exclude` (the held-out problems)."""
    corpus = pretraining_corpus(task_cfg, knobs(task_cfg)["corpus_size"], exclude)
    return [
        to_sample(p, f"chain-corpus-{i}", task_cfg, task="chain", solution=text)
        for i, (p, text) in enumerate(corpus)
    ]


def oracle_step_values(sample: Sample, text: str) -> list[float]:
    """A perfect PRM's value after each step of `text` (steps as `split_steps`): 1 before the first
    wrong step, 0 from it on (reward.prm.oracle)."""
    k = first_error(parse_question(sample.extra["question"]), text)
    return [1.0 if k == -1 or i < k else 0.0 for i in range(len(split_steps(text)))]
