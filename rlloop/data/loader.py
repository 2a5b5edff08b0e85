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


def jsonl_rows(path: Path, row_word: str = "line") -> list[tuple[int, Any]]:
    """[(1-based line, object)] of a jsonl file; blank lines skipped.

    Lines are decoded one by one, so a file with non-UTF-8 bytes fails naming the line and byte column
    (Python's text reader would raise a bare UnicodeDecodeError with a file offset and no line).
    """
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: {row_word} {lineno}: not UTF-8 text (byte {raw[e.start : e.start + 1]!r} at "
                    f"column {e.start + 1}); re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                sep = " is" if row_word == "line" else ":"
                raise DataError(f"{path}: {row_word} {lineno}{sep} not valid JSON ({e.msg})") from None
    return rows


def _read_rows(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return jsonl_rows(path)
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
    first_row: dict[str, str] = {}  # uid -> where it first appeared
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
        if not isinstance(prompt, (str, list)):
            raise DataError(
                f"{where}: column 'prompt' must be text or chat messages, got {type(prompt).__name__}"
            )
        if isinstance(prompt, list) and not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt
        ):
            raise DataError(f"{where}: column 'prompt' is a list but not of {{'role', 'content'}} messages")
        answer = row.get("answer")
        if answer is None or str(answer).strip() == "":
            raise DataError(f"{where}: column 'answer' is missing or empty")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "answer", "data_source", "uid")}
        uid = str(row["uid"]) if row.get("uid") is not None else f"{split}-{i}"
        if uid in first_row:
            # uids key the prompt cache and the trained-on record: two rows under one uid would be confused
            raise DataError(f"{where}: column 'uid' has duplicate value {uid!r} (first at {first_row[uid]})")
        first_row[uid] = where.rsplit(": ", 1)[-1]
        samples.append(
            Sample(
                uid=uid,
                prompt=prompt,
                data_source=str(row.get("data_source") or data_source),
                ground_truth=str(answer),
                extra=extra,
            )
        )
    logger.info("loaded %d %s samples from %s", len(samples), split, path)
    return samples


def build_datasets(task_cfg: Any) -> tuple[list[Sample], list[Sample]]:
    """(train, test) Samples for `task_cfg.name`: a built-in task (`rlloop.tasks.BUILTIN`: arith, chain)
    or "file" (train_path/test_path).

    For file tasks `num_test` > 0 caps the test set (0 = all); without a test_path the test set is empty.
    """
    from rlloop.tasks import BUILTIN

    name = task_cfg.name
    if name in BUILTIN:
        return BUILTIN[name].make_splits(task_cfg)
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
        train_prompts = {s.uid: s.prompt for s in train}
        for s in test:
            if s.uid in train_prompts and train_prompts[s.uid] != s.prompt:
                raise DataError(
                    f"{task_cfg.test_path}: uid {s.uid!r} is also in {task_cfg.train_path} with another "
                    "prompt; a uid must name one prompt across task.train_path and task.test_path"
                )
        return train, test
    raise ConfigError(f"task.name={name!r} is not a known task; use one of {sorted(BUILTIN)} or 'file'")


def max_positions(model_path: str) -> int | None:
    """The model's context length from its config.json (None when it states none)."""
    p = Path(model_path) / "config.json"
    if not p.is_file():
        return None
    cfg = json.loads(p.read_text())
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return int(cfg[key])
    return None


def check_prompt_lengths(
    samples: list[Sample], tokenizer: Any, task_cfg: Any, *, max_new_tokens: int, context: int | None
) -> None:
    """DataError naming the first sample whose prompt tokens + rollout.max_new_tokens exceed `context`.

    A longer prompt would fail deep inside a rollout worker (position index out of range) or be cut
    silently. Only prompts whose UTF-8 byte length could exceed the budget are tokenized (a byte-level
    tokenizer never makes more tokens than bytes), so a large data set costs little.
    """
    if not context:
        return
    budget = context - max_new_tokens
    if budget < 1:
        raise ConfigError(
            f"config rollout.max_new_tokens={max_new_tokens}: leaves no room for a prompt in the model's "
            f"{context} positions"
        )
    overhead = len(
        render_prompt(Sample(uid="", prompt="", data_source="", ground_truth=""), tokenizer, task_cfg)
    )
    for s in samples:
        if isinstance(s.prompt, str) and len(s.prompt.encode("utf-8")) + overhead <= budget:
            continue
        n = len(render_prompt(s, tokenizer, task_cfg))
        if n > budget:
            raise DataError(
                f"prompt uid {s.uid!r} is {n} tokens; with rollout.max_new_tokens={max_new_tokens} it "
                f"exceeds the model's {context} positions (shorten or drop the row, or lower "
                "rollout.max_new_tokens)"
            )


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
