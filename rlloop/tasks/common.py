"""What the built-in tasks share: reading a task config, filling its prompt template, problems -> Samples."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol, TypeVar

from rlloop.errors import ConfigError
from rlloop.types import Sample


class _Problem(Protocol):
    question: str


P = TypeVar("P", bound=_Problem)  # a task's problem type

MAX_CONSECUTIVE_MISSES = 20_000


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """`cfg.key` of a task config given as a dataclass / DictConfig or as a plain dict."""
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def fill_prompt(question: str, task_cfg: Any) -> str:
    """The question put into `task_cfg.prompt_template` (which must contain `{question}`)."""
    template = cfg_get(task_cfg, "prompt_template") or "{question}"
    if "{question}" not in template:
        raise ConfigError(f"task.prompt_template must contain '{{question}}', got {template!r}")
    return template.replace("{question}", question)


def to_sample(problem: Any, uid: str, task_cfg: Any, *, task: str, solution: str) -> Sample:
    """A built-in problem (`.question`, `.answer`) as a Sample with its worked `solution` in `extra`;
    data_source is `task.data_source`, else the task's name."""
    return Sample(
        uid=uid,
        prompt=fill_prompt(problem.question, task_cfg),
        data_source=cfg_get(task_cfg, "data_source") or task,
        ground_truth=str(problem.answer),
        extra={"solution": solution, "question": problem.question},
    )


def to_samples(
    problems: Sequence[Any], split: str, task_cfg: Any, *, task: str, solution_text: Callable[[Any], str]
) -> list[Sample]:
    """`to_sample` of each problem, uids `{task}-{split}-{i}`."""
    return [
        to_sample(p, f"{task}-{split}-{i}", task_cfg, task=task, solution=solution_text(p))
        for i, p in enumerate(problems)
    ]


def draw_distinct(
    n: int, draw: Callable[[], P | None], *, exclude: Collection[str], what: str, widen: str
) -> list[P]:
    """`n` problems from repeated `draw()` calls with distinct `.question`s, none in `exclude`; `draw`
    returns None for a draw the task rejects. Deterministic when `draw` is.

    More than MAX_CONSECUTIVE_MISSES rejected or repeated draws in a row (knobs that have run out of
    problems) raise ConfigError: "could only generate k of n distinct {what}; ... or widen {widen}".
    """
    seen = set(exclude)
    out: list[P] = []
    misses = 0
    while len(out) < n:
        p = draw()
        if p is None or p.question in seen:
            misses += 1  # consecutive: a knob setting that has run out of problems fails fast
            if misses > MAX_CONSECUTIVE_MISSES:
                raise ConfigError(
                    f"could only generate {len(out)} of {n} distinct {what}; lower task.num_train/num_test "
                    f"or widen {widen}"
                )
            continue
        seen.add(p.question)
        out.append(p)
        misses = 0
    return out
