"""Data sets as lists of `Sample`: the built-in tasks or the user's jsonl/parquet files.

A user file has one row per prompt: a prompt (text, or a list of chat messages) and a gold answer, and
optionally `data_source` and `uid`. `task.train_path` may be one file, a list of files or a glob. The
prompt and answer columns are found by layout (`find_columns`): rlloop's `prompt`/`answer`, verl's
`prompt` messages with `reward_model.ground_truth` (its `extra_info` passed through as-is), TRL's
`prompt` with `solution`/`answer`/`ground_truth`, OpenRLHF's `input` or `task.input_key`/`label_key`, or
any columns named by `task.prompt_key`/`task.answer_key`. Every column but the prompt, `uid` and
`data_source` lands in `Sample.extra` (a TRL reward function gets them as keyword lists). Bad input fails
at load time with the file, the row and the column in the message.
"""

from __future__ import annotations

import glob
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


# Auto-detected columns when no key is configured, first present wins. "input" is OpenRLHF's default
# input_key; "question"/"problem" are GSM8K's and MATH's. verl keeps its gold in reward_model.ground_truth.
PROMPT_KEYS = ("prompt", "input", "question", "problem")
ANSWER_KEYS = ("answer", "reward_model.ground_truth", "ground_truth", "solution", "label")


def _get_path(row: dict, key: str) -> Any:
    """row[key], where a dotted key reaches into nested objects ("reward_model.ground_truth")."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _config_key(task_cfg: Any, name: str, alias: str) -> str | None:
    """task.<name> or its OpenRLHF spelling task.<alias>; ConfigError when both are set and differ."""
    value = getattr(task_cfg, name, None) if task_cfg is not None else None
    other = getattr(task_cfg, alias, None) if task_cfg is not None else None
    if value and other and value != other:
        raise ConfigError(f"config task.{name}={value!r} and task.{alias}={other!r} name different columns")
    return value or other or None


def find_columns(row: dict, task_cfg: Any = None) -> tuple[str, str]:
    """(prompt column, answer column) of a data set, from its first row: the configured keys
    (`task.prompt_key`/`input_key`, `task.answer_key`/`label_key`), else the first of PROMPT_KEYS and
    ANSWER_KEYS the row has. A column neither configured nor found keeps rlloop's name ("prompt",
    "answer"), so the row check names it as missing."""
    prompt_key = _config_key(task_cfg, "prompt_key", "input_key")
    answer_key = _config_key(task_cfg, "answer_key", "label_key")
    if prompt_key is None:
        prompt_key = next((k for k in PROMPT_KEYS if k in row), "prompt")
    if answer_key is None:
        answer_key = next((k for k in ANSWER_KEYS if _get_path(row, k) is not None), "answer")
    return prompt_key, answer_key


def resolve_paths(spec: Any, key: str) -> list[Path]:
    """The files of `task.<key>`: one path, a list of paths, or glob patterns (each must match a file)."""
    entries = [spec] if isinstance(spec, (str, Path)) else list(spec or [])
    if not entries:
        raise DataError(f"task.{key} is empty: give a .jsonl/.parquet file, a list of them or a glob")
    paths: list[Path] = []
    for entry in entries:
        text = str(Path(str(entry)).expanduser())
        if glob.has_magic(text):
            matches = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"data glob matches no file: {entry} (task.{key})")
            paths.extend(Path(p) for p in matches)
            continue
        p = Path(text)
        if not p.exists():
            raise DataError(f"data file not found: {entry} (task.{key})")
        if p.is_dir():
            raise DataError(
                f"data path is a directory, not a file: {entry} (task.{key}); use a glob such as "
                f"{entry}/*.parquet"
            )
        paths.append(p)
    return paths


def _gold_text(value: Any) -> str:
    # a list/dict gold (verl code sets keep test cases there) stays machine-readable as JSON
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def load_samples(path: Any, *, data_source: str, split: str, task_cfg: Any = None) -> list[Sample]:
    """Samples from jsonl/parquet files (`path`: a file, a list of files or a glob); uids default to
    f"{split}-{i}" with i counting rows over all files.

    The prompt and answer columns come from `find_columns` (config keys or the detected layout) and are
    fixed per file by its first row. Raises DataError naming the file (missing, empty, unreadable) or the
    row and column (a row that is not an object, or without a usable prompt or answer).
    """
    samples = []
    first_row: dict[str, tuple[Path, str]] = {}  # uid -> (file, row) where it first appeared
    for p in resolve_paths(path, f"{split}_path"):
        rows = _read_rows(p)
        if not rows:
            raise DataError(f"data file is empty: {p} (task.{split}_path)")
        columns = None
        for row_no, row in rows:
            where = _row_name(p, row_no)
            if not isinstance(row, dict):
                raise DataError(
                    f"{where}: expected an object with a prompt and an answer column, got {type(row).__name__}"
                )
            if columns is None:
                columns = find_columns(row, task_cfg)
            prompt_key, answer_key = columns
            prompt = _get_path(row, prompt_key)
            if (
                prompt is None
                or (isinstance(prompt, str) and not prompt.strip())
                or (isinstance(prompt, list) and not prompt)
            ):
                raise DataError(f"{where}: column {prompt_key!r} is missing or empty")
            if not isinstance(prompt, (str, list)):
                raise DataError(
                    f"{where}: column {prompt_key!r} must be text or chat messages, got {type(prompt).__name__}"
                )
            if isinstance(prompt, list):
                if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
                    raise DataError(
                        f"{where}: column {prompt_key!r} is a list but not of {{'role', 'content'}} messages"
                    )
                # parquet structs come back with every field of the schema; keep role and content
                prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
            answer = _get_path(row, answer_key)
            if answer is None or str(answer).strip() == "":
                hint = (
                    f" (nor any of {list(ANSWER_KEYS[1:])}; name it with task.answer_key)"
                    if answer_key == "answer"
                    else ""
                )
                raise DataError(f"{where}: column {answer_key!r} is missing or empty{hint}")
            extra = {k: v for k, v in row.items() if k not in (prompt_key, "data_source", "uid")}
            i = len(samples)
            uid = str(row["uid"]) if row.get("uid") is not None else f"{split}-{i}"
            if uid in first_row:
                # uids key the prompt cache and the trained-on record: two rows under one uid would be confused
                first_file, first_at = first_row[uid]
                first = first_at if first_file == p else f"{first_file}: {first_at}"
                raise DataError(f"{where}: column 'uid' has duplicate value {uid!r} (first at {first})")
            first_row[uid] = (p, where.rsplit(": ", 1)[-1])
            samples.append(
                Sample(
                    uid=uid,
                    prompt=prompt,
                    data_source=str(row.get("data_source") or data_source),
                    ground_truth=_gold_text(answer),
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
            raise ConfigError(
                "task=file needs task.train_path (a .jsonl or .parquet file, a list of them or a glob)"
            )
        train = load_samples(
            task_cfg.train_path, data_source=task_cfg.data_source, split="train", task_cfg=task_cfg
        )
        test = []
        if task_cfg.test_path:
            test = load_samples(
                task_cfg.test_path, data_source=task_cfg.data_source, split="test", task_cfg=task_cfg
            )
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


OVERLONG_MODES = ("filter", "truncate", "error")


def check_prompt_lengths(
    samples: list[Sample], tokenizer: Any, task_cfg: Any, *, max_new_tokens: int, context: int | None
) -> None:
    """DataError naming the first sample whose prompt tokens + rollout.max_new_tokens exceed `context`
    (`fit_prompt_lengths` with task.overlong_prompts=error)."""
    fit_prompt_lengths(
        samples, tokenizer, task_cfg, max_new_tokens=max_new_tokens, context=context, mode="error"
    )


def fit_prompt_lengths(
    samples: list[Sample],
    tokenizer: Any,
    task_cfg: Any,
    *,
    max_new_tokens: int,
    context: int | None,
    split: str = "data",
    mode: str | None = None,
) -> list[Sample]:
    """The samples whose rendered prompt fits `context` - `max_new_tokens` tokens, by
    `task.overlong_prompts` (or `mode`): filter (drop the others, counted in a warning), truncate (cut
    the end of the prompt's text, its last message for chat prompts, so the template stays whole) or
    error (DataError naming the first).

    A longer prompt would fail deep inside a rollout worker (position index out of range) or be cut
    silently. Only prompts whose UTF-8 byte length could exceed the budget are tokenized (a byte-level
    tokenizer never makes more tokens than bytes), so a large data set costs little.
    """
    if not context:
        return samples
    mode = mode or str(getattr(task_cfg, "overlong_prompts", None) or "filter")
    if mode not in OVERLONG_MODES:
        raise ConfigError(f"config task.overlong_prompts={mode!r}: must be one of {list(OVERLONG_MODES)}")
    budget = context - max_new_tokens
    if budget < 1:
        raise ConfigError(
            f"config rollout.max_new_tokens={max_new_tokens}: leaves no room for a prompt in the model's "
            f"{context} positions"
        )
    overhead = len(
        render_prompt(Sample(uid="", prompt="", data_source="", ground_truth=""), tokenizer, task_cfg)
    )
    kept, dropped, truncated = [], [], []
    for s in samples:
        if isinstance(s.prompt, str) and len(s.prompt.encode("utf-8")) + overhead <= budget:
            kept.append(s)
            continue
        n = len(render_prompt(s, tokenizer, task_cfg))
        if n <= budget:
            kept.append(s)
        elif mode == "error":
            raise DataError(
                f"prompt uid {s.uid!r} is {n} tokens; with rollout.max_new_tokens={max_new_tokens} it "
                f"exceeds the model's {context} positions (shorten or drop the row, lower "
                "rollout.max_new_tokens, or set task.overlong_prompts=filter|truncate)"
            )
        elif mode == "truncate" and (cut := _truncate(s, tokenizer, task_cfg, budget)) is not None:
            kept.append(cut)
            truncated.append(s.uid)
        else:
            dropped.append(s.uid)
    for what, uids in (("dropped", dropped), ("truncated", truncated)):
        if uids:
            logger.warning(
                "%d of %d %s prompts are over %d tokens (the model's %d positions - rollout.max_new_tokens "
                "%d) and were %s (task.overlong_prompts=%s); first uids: %s",
                len(uids),
                len(samples),
                split,
                budget,
                context,
                max_new_tokens,
                what,
                mode,
                uids[:5],
            )
    return kept


def _truncate(sample: Sample, tokenizer: Any, task_cfg: Any, budget: int) -> Sample | None:
    """`sample` with the end of its (last message's) text cut until it renders within `budget` tokens;
    None when even an empty text does not fit (the system prompt or earlier messages are too long)."""
    import dataclasses

    def with_text(text: str) -> Sample:
        if isinstance(sample.prompt, str):
            return dataclasses.replace(sample, prompt=text)
        messages = [dict(m) for m in sample.prompt]
        messages[-1]["content"] = text
        return dataclasses.replace(sample, prompt=messages)

    text = sample.prompt if isinstance(sample.prompt, str) else sample.prompt[-1]["content"]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    keep = len(ids)
    while keep > 0:
        candidate = with_text(tokenizer.decode(ids[:keep]))
        n = len(render_prompt(candidate, tokenizer, task_cfg))
        if n <= budget:
            return candidate
        keep -= max(1, n - budget)
    return None


def _apply_template(sample: Sample, task_cfg: Any) -> Sample:
    template = getattr(task_cfg, "prompt_template", None) or "{question}"
    if isinstance(sample.prompt, str) and template != "{question}":
        from rlloop.tasks.common import fill_prompt

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


def uses_chat_template(task_cfg: Any) -> bool:
    """task.apply_chat_template (default true); false feeds the prompt's raw text to the model."""
    value = getattr(task_cfg, "apply_chat_template", True) if task_cfg is not None else True
    return True if value is None else bool(value)


def chat_template_kwargs(task_cfg: Any) -> dict[str, Any]:
    """task.chat_template_kwargs as a plain dict, e.g. {"enable_thinking": False} for Qwen3."""
    value = getattr(task_cfg, "chat_template_kwargs", None) if task_cfg is not None else None
    if not value:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            return dict(OmegaConf.to_container(value, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover
        pass
    return dict(value)


def raw_prompt_text(sample: Sample, task_cfg: Any = None) -> str:
    """The prompt without a chat template (task.apply_chat_template=false): the system prompt and every
    message's content, joined by blank lines."""
    return "\n\n".join(m["content"] for m in chat_messages(sample, task_cfg))


def prompt_text(sample: Sample, tokenizer: Any, task_cfg: Any = None) -> str:
    """The prompt as the model reads it: the chat template over `chat_messages` with the assistant turn
    opened and `task.chat_template_kwargs`, or the raw text when task.apply_chat_template=false."""
    if not uses_chat_template(task_cfg):
        return raw_prompt_text(sample, task_cfg)
    return tokenizer.apply_chat_template(
        chat_messages(sample, task_cfg),
        tokenize=False,
        add_generation_prompt=True,
        **chat_template_kwargs(task_cfg),
    )


def render_prompt(sample: Sample, tokenizer, task_cfg: Any = None) -> list[int]:
    """Prompt token ids of `prompt_text`."""
    # a chat template already holds any BOS it wants; raw text gets the tokenizer's own (as TRL does)
    return tokenizer(
        prompt_text(sample, tokenizer, task_cfg), add_special_tokens=not uses_chat_template(task_cfg)
    ).input_ids
