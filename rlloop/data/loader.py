"""Data sets as lists of `Sample`: the built-in arith task or the user's jsonl/parquet files.

A user file has one row per prompt with columns `prompt` (text, or a list of chat messages) and
`answer` (the ground truth), and optionally `data_source` and `uid`. Bad input fails at load time with
the file, the row and the column in the message.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rlloop.errors import ConfigError, RlloopError
from rlloop.types import Sample

logger = logging.getLogger(__name__)


class DataError(RlloopError, ValueError):
    """A data file that cannot be used; the message names the file, and the row and column if any."""


def _read_rows(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
        return rows
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet file ({e})") from None
        return list(enumerate(table.to_pylist()))
    raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl or .parquet")


def _row_name(path: Path, row: int) -> str:
    # jsonl rows are reported by line number (what an editor shows), parquet rows by index
    return (
        f"{path}: line {row}"
        if path.suffix.lower() != ".parquet" and path.suffix.lower() != ".pq"
        else f"{path}: row {row}"
    )


def load_samples(path: str, *, data_source: str, split: str) -> list[Sample]:
    """Samples from a jsonl or parquet file; uids default to f"{split}-{i}".

    Raises DataError naming the file (missing, empty, unreadable) or the row and column (a row that
    is not an object, or has no `prompt`/`answer`).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file not found: {path} (task.{split}_path)")
    if p.is_dir():
        raise DataError(f"data path is a directory, not a file: {path} (task.{split}_path)")
    rows = _read_rows(p)
    if not rows:
        raise DataError(f"data file is empty: {path} (task.{split}_path)")
    samples = []
    for i, (row_no, row) in enumerate(rows):
        where = _row_name(p, row_no)
        if not isinstance(row, dict):
            raise DataError(
                f"{where}: expected an object with columns 'prompt' and 'answer', got {type(row).__name__}"
            )
        prompt = row.get("prompt")
        if (
            prompt is None
            or (isinstance(prompt, str) and not prompt.strip())
            or (isinstance(prompt, list) and not prompt)
        ):
            raise DataError(f"{where}: column 'prompt' is missing or empty")
        if isinstance(prompt, list) and not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt
        ):
            raise DataError(f"{where}: column 'prompt' is a list but not of {{'role', 'content'}} messages")
        answer = row.get("answer")
        if answer is None or str(answer).strip() == "":
            raise DataError(f"{where}: column 'answer' is missing or empty")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "answer", "data_source", "uid")}
        samples.append(
            Sample(
                uid=str(row["uid"]) if row.get("uid") is not None else f"{split}-{i}",
                prompt=prompt,
                data_source=str(row.get("data_source") or data_source),
                ground_truth=str(answer),
                extra=extra,
            )
        )
    uids = [s.uid for s in samples]
    if len(set(uids)) != len(uids):
        dup = next(u for u in uids if uids.count(u) > 1)
        raise DataError(f"{path}: column 'uid' has duplicate value {dup!r}")
    logger.info("loaded %d %s samples from %s", len(samples), split, path)
    return samples


def build_datasets(task_cfg: Any) -> tuple[list[Sample], list[Sample]]:
    """(train, test) Samples for `task_cfg.name`: "arith" (built in) or "file" (train_path/test_path).

    For file tasks `num_test` > 0 caps the test set (0 = all); without a test_path the test set is empty.
    """
    name = task_cfg.name
    if name == "arith":
        from rlloop.tasks.arith import make_splits

        return make_splits(task_cfg)
    if name == "file":
        if not task_cfg.train_path:
            raise ConfigError("task=file needs task.train_path (a .jsonl or .parquet file)")
        train = load_samples(task_cfg.train_path, data_source=task_cfg.data_source, split="train")
        test = []
        if task_cfg.test_path:
            test = load_samples(task_cfg.test_path, data_source=task_cfg.data_source, split="test")
            if task_cfg.num_test and task_cfg.num_test > 0:
                test = test[: task_cfg.num_test]
        train = [_apply_template(s, task_cfg) for s in train]
        test = [_apply_template(s, task_cfg) for s in test]
        return train, test
    raise ConfigError(f"task.name={name!r} is not a known task; use 'arith' or 'file'")


def _apply_template(sample: Sample, task_cfg: Any) -> Sample:
    template = getattr(task_cfg, "prompt_template", None) or "{question}"
    if isinstance(sample.prompt, str) and template != "{question}":
        from rlloop.tasks.arith import fill_prompt

        sample.prompt = fill_prompt(sample.prompt, task_cfg)
    return sample


def chat_messages(sample: Sample, task_cfg: Any = None) -> list[dict[str, str]]:
    """The chat messages of a sample: optional `task_cfg.system_prompt`, then the prompt."""
    system = getattr(task_cfg, "system_prompt", None) if task_cfg is not None else None
    if isinstance(sample.prompt, list):
        messages = [dict(m) for m in sample.prompt]
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        return messages
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": sample.prompt}
    ]


def render_prompt(sample: Sample, tokenizer, task_cfg: Any = None) -> list[int]:
    """Prompt token ids: the chat template over `chat_messages`, with the assistant turn opened."""
    text = tokenizer.apply_chat_template(
        chat_messages(sample, task_cfg), tokenize=False, add_generation_prompt=True
    )
    # the template already holds any BOS it wants; do not add another
    return tokenizer(text, add_special_tokens=False).input_ids
