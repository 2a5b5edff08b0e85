"""PRM training data: TDRM transition files, whole trajectories with outcomes, and rlloop rollouts.

Three formats (jsonl, or parquet where noted), each validated at load time; a bad row fails with the
file, the 1-based row (the line number for jsonl) and the field in the message.

- transitions (TDRM's released schema, jsonl or parquet; fields may sit at the top level or inside a
  `conversations` object, as in TDRM's data sets): `question`, `state1` (the solution prefix),
  `label` (outcome, in [0, 1]), `done` (1 if state1 is terminal), and either
  1-step: `state2`, `reward`; or n-step: `state3` (state n steps on), `reward_1`..`reward_n`,
  `state3_mask` (0 when no state lies n steps on: the window ended at the terminal state).
- trajectories (jsonl): `{"question": str, "steps": [str, ...], "correct": 0/1 | bool}`, optional
  `step_labels: [float]` (per-step hard/MC labels for the ScalarPRM baseline).
- rollouts (jsonl written by rlloop: the fields of `rlloop.types.Rollout` plus `correct`; without
  `correct`, the mean of the `outcome` dict is used).
- trl_stepwise (TRL's stepwise-supervision format, what PRMTrainer reads; jsonl or parquet): `prompt`
  (text, or chat messages whose contents are joined by blank lines), `completions` (the steps, a list
  of strings) and `labels` (one bool or 0/1 per step). The labels become `step_labels` (td=labels trains
  on them) and the outcome is 1 when every step is labelled right (what td0/mc/... learn from).

Trajectories, rollouts and TRL rows all load to the same example dict:
`{"prompt_text", "response_text", "step_char_ends", "outcome", "step_labels" (or None)}`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rlloop.data.loader import DataError, jsonl_rows
from rlloop.rollout.steps import split_steps

STEP_JOIN = "\n\n"


def read_rows(path: str | Path, kind: str = "") -> tuple[Path, list[tuple[int, Any]]]:
    """(path, [(1-based row, object)]) of a jsonl or parquet file; raises DataError naming the file.

    `kind` (e.g. "pair") only words the messages: "no such pair file".
    """
    p = Path(path).expanduser()
    label = f"{kind} file" if kind else "file"
    if not p.is_file():
        raise DataError(f"{p}: no such {label}")
    suffix = p.suffix.lower()
    rows: list[tuple[int, Any]] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = jsonl_rows(p, row_word="row")
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            rows = list(enumerate(pq.read_table(p).to_pylist(), start=1))
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{p}: cannot read parquet file ({e})") from None
    else:
        raise DataError(f"{p}: unsupported {label} type {suffix!r}; use .jsonl or .parquet")
    if not rows:
        raise DataError(f"{p}: {label} has no rows")
    return p, rows


def _where(p: Path, row: int, field: str) -> str:
    return f"{p}: row {row}, field {field!r}"


def _number(
    p: Path, row: int, obj: dict, field: str, *, lo: float | None = None, hi: float | None = None
) -> float:
    if field not in obj or obj[field] is None:
        raise DataError(f"{_where(p, row, field)}: missing")
    value = obj[field]
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise DataError(f"{_where(p, row, field)}: expected a finite number, got {value!r}")
    value = float(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise DataError(f"{_where(p, row, field)}: {value} is outside [{lo}, {hi}]")
    return value


def _string(p: Path, row: int, obj: dict, field: str) -> str:
    if field not in obj or obj[field] is None:
        raise DataError(f"{_where(p, row, field)}: missing")
    if not isinstance(obj[field], str):
        raise DataError(f"{_where(p, row, field)}: expected a string, got {type(obj[field]).__name__}")
    return obj[field]


def _object(p: Path, row: int, obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{p}: row {row}: expected a JSON object, got {type(obj).__name__}")
    return obj


def load_transitions(path: str | Path) -> list[dict]:
    """TDRM transitions -> `[{"question", "state", "next_state", "rewards": [r_1..r_n], "label", "done",
    "next_mask", "n"}]` (`next_state` is None for terminal rows; `n` = 1 for `state2` files)."""
    p, rows = read_rows(path)
    out = []
    for row, raw in rows:
        obj = _object(p, row, raw)
        if isinstance(obj.get("conversations"), dict):  # TDRM's data sets nest the fields
            obj = {**obj, **obj["conversations"]}
        done = _number(p, row, obj, "done", lo=0, hi=1)
        if done not in (0.0, 1.0):
            raise DataError(f"{_where(p, row, 'done')}: expected 0/1, got {obj['done']!r}")
        item = {
            "question": _string(p, row, obj, "question"),
            "state": _string(p, row, obj, "state1"),
            "label": _number(p, row, obj, "label", lo=0, hi=1),
            "done": bool(done),
        }
        if "state3" in obj or "reward_1" in obj:
            n = 1
            while f"reward_{n + 1}" in obj:
                n += 1
            rewards = [_number(p, row, obj, f"reward_{i}") for i in range(1, n + 1)]
            next_mask = _number(p, row, obj, "state3_mask", lo=0, hi=1)
            next_state = obj.get("state3")
            if next_mask and not isinstance(next_state, str):
                raise DataError(f"{_where(p, row, 'state3')}: missing (state3_mask is 1)")
        else:
            n = 1
            rewards = [_number(p, row, obj, "reward")]
            next_mask = 1.0
            next_state = obj.get("state2")
            if not done and not isinstance(next_state, str):
                raise DataError(f"{_where(p, row, 'state2')}: missing (need `state2` or `state3`)")
        item.update(
            next_state=next_state if (next_mask and not done) else None,
            rewards=rewards,
            next_mask=float(next_mask),
            n=n,
        )
        out.append(item)
    return out


def steps_to_example(
    prompt_text: str,
    steps: list[str],
    outcome: float,
    step_labels: list[float] | None = None,
    *,
    join: str = STEP_JOIN,
) -> dict:
    """An example dict from a prompt and its steps (joined by `join`; step k ends at its last char)."""
    ends, pos = [], 0
    for k, s in enumerate(steps):
        if k:
            pos += len(join)
        pos += len(s)
        ends.append(pos)
    return {
        "prompt_text": prompt_text,
        "response_text": join.join(steps),
        "step_char_ends": ends,
        "outcome": float(outcome),
        "step_labels": step_labels,
    }


def load_trajectories(path: str | Path) -> list[dict]:
    """Trajectories jsonl -> example dicts (see module docstring); the prompt is the question + a blank line."""
    p, rows = read_rows(path)
    out = []
    for row, raw in rows:
        obj = _object(p, row, raw)
        question = _string(p, row, obj, "question")
        steps = obj.get("steps")
        if steps is None:
            raise DataError(f"{_where(p, row, 'steps')}: missing")
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise DataError(f"{_where(p, row, 'steps')}: expected a list of strings")
        if not steps or not any(s.strip() for s in steps):
            raise DataError(f"{_where(p, row, 'steps')}: trajectory has zero steps")
        if any(not s.strip() for s in steps):
            k = next(i for i, s in enumerate(steps) if not s.strip())
            raise DataError(f"{_where(p, row, 'steps')}: step {k} is empty")
        correct = _number(p, row, obj, "correct", lo=0, hi=1)
        labels = obj.get("step_labels")
        if labels is not None:
            if not isinstance(labels, list) or len(labels) != len(steps):
                raise DataError(f"{_where(p, row, 'step_labels')}: expected a list of {len(steps)} numbers")
            labels = [_number(p, row, {"step_labels": x}, "step_labels", lo=0, hi=1) for x in labels]
        out.append(steps_to_example(question + STEP_JOIN, [s.strip() for s in steps], correct, labels))
    return out


def load_rollouts(
    path: str | Path, *, step_delimiter: str = STEP_JOIN, step_regex: str | None = None
) -> list[dict]:
    """rlloop rollouts jsonl -> example dicts. Steps come from `step_char_ends` (recomputed from `text`
    with the delimiter when the field is absent); the outcome from `correct`, else mean(`outcome`)."""
    p, rows = read_rows(path)
    out = []
    for row, raw in rows:
        obj = _object(p, row, raw)
        text = _string(p, row, obj, "text")
        prompt_text = _string(p, row, obj, "prompt_text")
        ends = obj.get("step_char_ends")
        if ends is None:
            ends = [e for _, e in split_steps(text, step_delimiter, step_regex)]
        if not isinstance(ends, list) or not all(isinstance(e, int) and 0 < e <= len(text) for e in ends):
            raise DataError(f"{_where(p, row, 'step_char_ends')}: expected increasing ints in [1, len(text)]")
        if any(a > b for a, b in zip(ends, ends[1:], strict=False)):
            raise DataError(f"{_where(p, row, 'step_char_ends')}: not non-decreasing: {ends}")
        if not ends:
            raise DataError(f"{_where(p, row, 'text')}: rollout has zero steps (empty response)")
        if "correct" in obj:
            outcome = _number(p, row, obj, "correct", lo=0, hi=1)
        else:
            scores = obj.get("outcome")
            if not isinstance(scores, dict) or not scores:
                raise DataError(f"{_where(p, row, 'correct')}: missing (and no `outcome` scores)")
            outcome = sum(_number(p, row, scores, k, lo=0, hi=1) for k in scores) / len(scores)
        labels = obj.get("step_labels")
        if labels is not None:
            if not isinstance(labels, list) or len(labels) != len(ends):
                raise DataError(f"{_where(p, row, 'step_labels')}: expected a list of {len(ends)} numbers")
            labels = [_number(p, row, {"step_labels": x}, "step_labels", lo=0, hi=1) for x in labels]
        out.append(
            {
                "prompt_text": prompt_text,
                "response_text": text,
                "step_char_ends": [int(e) for e in ends],
                "outcome": outcome,
                "step_labels": labels,
                "uid": obj.get("uid"),
                "group": obj.get("group"),
            }
        )
    return out


def _trl_prompt(p: Path, row: int, obj: dict) -> str:
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return STEP_JOIN.join(str(m["content"]) for m in prompt)
    if isinstance(prompt, list):
        raise DataError(f"{_where(p, row, 'prompt')}: a list but not of {{'role', 'content'}} messages")
    prompt = _string(p, row, obj, "prompt")
    if not prompt.strip():
        raise DataError(f"{_where(p, row, 'prompt')}: empty")
    return prompt


def load_trl_stepwise(path: str | Path) -> list[dict]:
    """TRL stepwise-supervision rows (`prompt`, `completions`, `labels`) -> example dicts; the prompt is
    followed by a blank line, the steps joined by blank lines (rlloop's default step delimiter)."""
    p, rows = read_rows(path)
    out = []
    for row, raw in rows:
        obj = _object(p, row, raw)
        prompt = _trl_prompt(p, row, obj)
        steps = obj.get("completions")
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise DataError(f"{_where(p, row, 'completions')}: expected a list of strings (the steps)")
        if not steps:
            raise DataError(f"{_where(p, row, 'completions')}: trajectory has zero steps")
        empty = [k for k, s in enumerate(steps) if not s.strip()]
        if empty:
            raise DataError(f"{_where(p, row, 'completions')}: step {empty[0]} is empty")
        labels = obj.get("labels")
        if not isinstance(labels, list) or len(labels) != len(steps):
            raise DataError(
                f"{_where(p, row, 'labels')}: expected a list of {len(steps)} labels, one per step"
            )
        labels = [_number(p, row, {"labels": x}, "labels", lo=0, hi=1) for x in labels]
        if any(x not in (0.0, 1.0) for x in labels):
            raise DataError(f"{_where(p, row, 'labels')}: expected bools or 0/1, got {obj['labels']!r}")
        outcome = float(all(x == 1.0 for x in labels))
        out.append(steps_to_example(prompt + STEP_JOIN, [s.strip() for s in steps], outcome, labels))
    return out


LOADERS = {
    "trajectories": load_trajectories,
    "rollouts": load_rollouts,
    "transitions": load_transitions,
    "trl_stepwise": load_trl_stepwise,
}


def load_examples(fmt: str, path: str | Path, **kwargs: Any) -> list[dict]:
    """The loader of `fmt` (`LOADERS`; only rollouts take kwargs; transitions have their own shape)."""
    if fmt not in LOADERS:
        raise DataError(f"data.format={fmt!r} is not known; use {' | '.join(LOADERS)}")
    return LOADERS[fmt](path, **kwargs)


__all__ = [
    "LOADERS",
    "load_examples",
    "load_rollouts",
    "load_trajectories",
    "load_transitions",
    "load_trl_stepwise",
    "steps_to_example",
]
