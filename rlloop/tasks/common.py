"""What the built-in tasks share: reading a task config, filling its prompt template, problems -> Samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rlloop.errors import ConfigError
from rlloop.types import Sample


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
