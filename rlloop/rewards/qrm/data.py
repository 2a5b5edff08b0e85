"""Preference pairs for Q-RM: loading them (`prompt`, `chosen`, `rejected`) and building them.

A pair file is jsonl or parquet, one pair per row: `prompt` (the text before the completion — by
default exactly what the model sees, chat template already applied, as in `Rollout.prompt_text`; or a
plain question / a list of chat messages that `qrm_train data.prompt_format=chat` renders), `chosen` and
`rejected` (completion texts). Optional: `group` (the prompt's id; held-out splits keep a group together).
A bad row fails at load time naming the file, the 1-based row (the line for jsonl) and the column.

Pairs are built without external data from rlloop's own verified rollouts (a correct and a wrong answer
to the same prompt, `pairs_from_rollouts`), or, cheaper and with a known error location, from a task's
worked solutions against copies with one wrong number (`corrupt_solution`, `pairs_from_solutions`).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

from rlloop.data.loader import DataError
from rlloop.rewards.prm.data import read_rows

COLUMNS = ("prompt", "chosen", "rejected")
_CALC = re.compile(r"^(\d+) ([+\-*/]) (\d+) = (\d+)$")


def _read_rows(path: str | Path) -> tuple[Path, list[tuple[int, Any]]]:
    return read_rows(path, kind="pair")


def validate_pair(obj: Any, where: str) -> dict:
    """The pair as `{"prompt", "chosen", "rejected", "group"}`; raises DataError prefixed with `where`."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with columns {list(COLUMNS)}, got {type(obj).__name__}")
    missing = [c for c in COLUMNS if obj.get(c) is None]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} (a pair needs {list(COLUMNS)})")
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            raise DataError(f"{where}: column 'prompt' is a list but not of {{'role', 'content'}} messages")
    elif not isinstance(prompt, str):
        raise DataError(
            f"{where}: column 'prompt' must be text or chat messages, got {type(prompt).__name__}"
        )
    for col in ("chosen", "rejected"):
        if not isinstance(obj[col], str):
            raise DataError(f"{where}: column {col!r} must be text, got {type(obj[col]).__name__}")
        if not obj[col].strip():
            raise DataError(f"{where}: column {col!r} is an empty completion")
    if obj["chosen"] == obj["rejected"]:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' are identical (a pair must differ): {obj['chosen'][:60]!r}"
        )
    group = obj.get("group")
    if group is None:
        group = json.dumps(prompt, sort_keys=True) if isinstance(prompt, list) else prompt
    return {"prompt": prompt, "chosen": obj["chosen"], "rejected": obj["rejected"], "group": str(group)}


def load_pairs(path: str | Path) -> list[dict]:
    """Validated pairs of a jsonl/parquet file (see the module docstring); DataError names file and row."""
    p, rows = _read_rows(path)
    return [validate_pair(obj, f"{p}: row {row}") for row, obj in rows]


def write_pairs(pairs: Sequence[dict], path: str | Path) -> str:
    """Write pairs as jsonl (every key of each pair is kept)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")
    return str(p)


def pairs_from_rollouts(
    rollouts: Sequence[dict], *, max_pairs_per_prompt: int = 4, seed: int = 0
) -> list[dict]:
    """Pairs (chosen = a correct completion, rejected = a wrong one) of the same prompt.

    rollouts: dicts with `group`, `prompt` (text before the completion), `text` and `correct` (1/0;
    > 0.5 counts as correct). Duplicate texts are collapsed; a prompt whose completions are all right or
    all wrong gives no pair. Up to `max_pairs_per_prompt` (correct, wrong) combinations per prompt,
    drawn so that each completion is reused as little as possible.
    """
    rng = random.Random(seed)
    by_group: dict[str, dict] = {}
    for i, r in enumerate(rollouts):
        for key in ("group", "prompt", "text", "correct"):
            if key not in r:
                raise DataError(f"rollout {i} (uid {r.get('uid')!r}) has no {key!r}")
        g = by_group.setdefault(str(r["group"]), {"prompt": r["prompt"], "good": [], "bad": []})
        side = "good" if float(r["correct"]) > 0.5 else "bad"
        if r["text"].strip() and r["text"] not in g[side]:
            g[side].append(r["text"])
    pairs = []
    for group, g in by_group.items():
        good, bad = g["good"], [t for t in g["bad"] if t not in g["good"]]
        if not good or not bad:
            continue
        rng.shuffle(good)
        rng.shuffle(bad)
        # zip-style cycling first (distinct completions), then the remaining combinations
        combos = [(good[i % len(good)], bad[i % len(bad)]) for i in range(max(len(good), len(bad)))]
        combos += [c for c in itertools.product(good, bad) if c not in combos]
        for chosen, rejected in combos[:max_pairs_per_prompt]:
            pairs.append({"prompt": g["prompt"], "chosen": chosen, "rejected": rejected, "group": group})
    return pairs


def _apply(a: int, op: str, x: int) -> int:
    return {"+": a + x, "-": a - x, "*": a * x, "/": a // x if x else a}[op]


CORRUPTIONS = ("result", "copy")


def corrupt_solution(
    steps: Sequence[str], answer: int, rng: random.Random, kind: str = "result"
) -> tuple[str, int, int] | None:
    """A worked `arith` solution with ONE wrong number; later steps carry on correctly from the wrong value
    (as a model that slipped once would), so the final answer is wrong too.

    kind="result": a calculation step's result is off by 1..9 (an arithmetic slip, "23 + 45 = 71");
    kind="copy": a calculation step's first operand is not the value the previous step reached (a copying
    slip, "... = 68" then "86 - 12 = 74").
    steps: the solution's steps ("Sam starts with 23 marbles.", "23 + 45 = 68", ..., "The answer is
    \\boxed{68}."). Returns (text, start, end): the corrupted solution and the character span of the first
    wrong number in it; None when the solution has no calculation step.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"corruption kind={kind!r}: use one of {list(CORRUPTIONS)}")
    calc = [k for k, s in enumerate(steps) if _CALC.match(s.strip())]
    if not calc:
        return None
    k = rng.choice(calc)
    a, op, x, result = _CALC.match(steps[k].strip()).groups()  # type: ignore[union-attr]
    for _ in range(50):
        right = int(result) if kind == "result" else int(a)
        wrong = right + rng.choice([d for d in range(-9, 10) if d])
        if wrong < 0 or (kind == "copy" and op == "-" and wrong < int(x)):
            continue
        out = list(steps)
        if kind == "result":
            prefix = f"{a} {op} {x} = "
            value = wrong
            out[k] = prefix + str(wrong)
        else:
            prefix = ""
            value = _apply(wrong, op, int(x))
            out[k] = f"{wrong} {op} {x} = {value}"
        for j in range(k + 1, len(steps)):
            m = _CALC.match(steps[j].strip())
            if m:
                _, op_j, x_j, _ = m.groups()
                new = _apply(value, op_j, int(x_j))
                out[j] = f"{value} {op_j} {x_j} = {new}"
                value = new
            elif "\\boxed{" in steps[j]:
                out[j] = f"The answer is \\boxed{{{value}}}."
        if value == answer:  # e.g. an integer division that swallowed the slip: not a wrong solution
            continue
        text = "\n\n".join(out)
        start = len("\n\n".join(out[:k])) + (2 if k else 0) + len(prefix)
        return text, start, start + len(str(wrong))
    return None


def pairs_from_solutions(
    problems: Sequence[Any],
    prompts: Sequence[Any],
    *,
    seed: int = 0,
    groups: Sequence[str] | None = None,
    kind: str = "result",
) -> list[dict]:
    """One pair per `arith` problem: chosen = its worked solution, rejected = `corrupt_solution` of it.

    problems: `rlloop.tasks.arith.ArithProblem`s; prompts[i]: the prompt of problem i (text or messages).
    Each pair also records `error_start`/`error_end`, the character span of the wrong number in `rejected`.
    """
    from rlloop.tasks.arith import solution_text

    rng = random.Random(seed)
    pairs = []
    for i, (p, prompt) in enumerate(zip(problems, prompts, strict=True)):
        bad = corrupt_solution(p.steps, p.answer, rng, kind)
        if bad is None:
            continue
        text, start, end = bad
        group = groups[i] if groups is not None else str(i)
        pairs.append(
            {
                "prompt": prompt,
                "chosen": solution_text(p),
                "rejected": text,
                "group": group,
                "error_start": start,
                "error_end": end,
            }
        )
    return pairs
