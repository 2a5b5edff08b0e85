"""The data check: unverifiable golds named by row, at load time and by `python -m rlloop.check_data`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlloop.config import TaskConfig, VerifierConfig
from rlloop.data.check import GoldProblem, check_golds, check_task_golds, row_labels
from rlloop.errors import ConfigError
from rlloop.types import Sample

REPO = Path(__file__).resolve().parents[2]

ROWS = [
    {"prompt": "2+2?", "answer": "4"},
    {"prompt": "C(10,5)?", "answer": "C(10, 5)"},
    {"prompt": "apples?", "answer": "The answer is 5 apples"},  # prose: line 3
    {"prompt": "half?", "answer": "\\frac{1}{2}, or equivalently 0.5"},
    {"prompt": "at least?", "answer": "5 or more", "uid": "more-1"},  # line 6 (a blank line before it)
    {"prompt": "yes?", "answer": "Yes"},
    {"prompt": "which?", "answer": "n = 2^k for some integer k"},  # line 8
]


def _write_jsonl(path: Path, rows) -> str:
    lines = [json.dumps(r) for r in rows]
    lines.insert(4, "")  # a blank line: rows are named by file line, not by index
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _samples(golds, source="math"):
    return [Sample(uid=f"u{i}", prompt="q", data_source=source, ground_truth=g) for i, g in enumerate(golds)]


def test_check_golds_lists_unverifiable_rows_in_order():
    golds = [r["answer"] for r in ROWS]
    problems = check_golds(_samples(golds))
    assert [(p.index, p.uid, p.gold) for p in problems] == [
        (2, "u2", "The answer is 5 apples"),
        (4, "u4", "5 or more"),
        (6, "u6", "n = 2^k for some integer k"),
    ]
    assert all(isinstance(p, GoldProblem) and p.reason.startswith("unverifiable") for p in problems)
    assert tuple(problems[0])[:3] == (2, "u2", "The answer is 5 apples")  # (row index, uid, gold, reason)


def test_check_golds_routes_by_data_source_and_skips_verifiers_without_a_gold_check():
    samples = _samples(["5 or more"], source="code") + _samples(["5 or more"], source="gsm")
    cfg = VerifierConfig(sources={"code": "code", "*": "math"})
    problems = check_golds(samples, cfg)
    assert [p.index for p in problems] == [1]
    assert check_golds(samples, {"*": "code"}) == []


def test_self_check_catches_a_gold_that_does_not_verify_against_itself(monkeypatch):
    from rlloop.rewards.verifiers import math as math_verifier

    real = math_verifier.parse_whole

    def broken(text, *, gold):  # a parser that reads golds and answers differently
        return real(text, gold=gold) if gold else real("7", gold=False)

    monkeypatch.setattr(math_verifier, "parse_whole", broken)
    math_verifier.parse_gold.cache_clear()
    try:
        problems = check_golds(_samples(["\\frac{1}{3}"]))
        assert len(problems) == 1 and "does not verify against itself" in problems[0].reason
        assert check_golds(_samples(["\\frac{1}{3}"]), self_check=False) == []
    finally:
        math_verifier.parse_gold.cache_clear()


def test_row_labels_name_file_lines_and_parquet_rows(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    labels = row_labels(f)
    assert len(labels) == len(ROWS) and labels[2] == f"{f}: line 3" and labels[4] == f"{f}: line 6"
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", "5 or more"]}), p)
    assert row_labels(p)[1] == f"{p}: row 1"


def _task(train_path, mode="warn"):
    cfg = TaskConfig(name="file", train_path=train_path, data_source="math")
    cfg.check_golds = mode  # the key lives in rlloop/config.py; set it here either way
    return cfg


def test_load_time_check_warns_naming_the_rows(tmp_path, caplog):
    from rlloop.data import build_datasets

    f = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    task = _task(f)
    train, test = build_datasets(task)
    with caplog.at_level(logging.WARNING, logger="rlloop.data.check"):
        check_task_golds(task, VerifierConfig(), train, test)
    text = caplog.text
    assert "3 gold answer(s) are unverifiable" in text and "3 of 7 train rows" in text
    for line in (3, 6, 8):
        assert f"{f}: line {line}:" in text
    assert "more-1" in text and "line 2:" not in text


def test_load_time_check_modes(tmp_path, caplog):
    from rlloop.data import build_datasets

    f = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    train, test = build_datasets(_task(f))
    with pytest.raises(ConfigError, match=r"line 6: uid 'more-1'"):
        check_task_golds(_task(f, "error"), VerifierConfig(), train, test)
    with caplog.at_level(logging.WARNING, logger="rlloop.data.check"):
        check_task_golds(_task(f, "off"), VerifierConfig(), train, test)
    assert caplog.text == ""
    with pytest.raises(ConfigError, match="task.check_golds"):
        check_task_golds(_task(f, "loud"), VerifierConfig(), train, test)
    good = _write_jsonl(tmp_path / "good.jsonl", [ROWS[i] for i in (0, 1, 3, 5)])
    train, test = build_datasets(_task(good))
    check_task_golds(_task(good, "error"), VerifierConfig(), train, test)  # nothing to report


def test_check_data_command_names_the_culprit_rows(tmp_path):
    """`python -m rlloop.check_data task=file task.train_path=...`: the first prompt, every bad row, exit 1."""
    f = _write_jsonl(tmp_path / "bad.jsonl", ROWS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "rlloop.check_data", "task=file", f"task.train_path={f}", "model=tiny"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 1, (out, proc.stderr)
    assert "<|user|>\n2+2?<|end|>\n<|assistant|>" in out  # the first prompt, chat template applied
    assert f"{f}: line 3: uid 'train-2': gold 'The answer is 5 apples': unverifiable" in out
    assert f"{f}: line 6: uid 'more-1'" in out and f"{f}: line 8: uid 'train-6'" in out
    assert "3 row(s) whose gold does not verify" in out
    assert "line 1:" not in out and "line 2:" not in out and "line 5:" not in out


def test_check_data_command_passes_a_clean_file_and_rejects_bad_input(tmp_path, capsys):
    from rlloop.check_data import main

    good = _write_jsonl(tmp_path / "good.jsonl", [ROWS[i] for i in (0, 1, 3, 5)])
    with pytest.raises(SystemExit) as exit_info:
        main(["task=file", f"task.train_path={good}"])
    assert exit_info.value.code == 0
    assert "every checked gold verifies against itself" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["task=file", f"task.train_path={tmp_path / 'missing.jsonl'}"])
    assert exit_info.value.code == 2 and "data file not found" in capsys.readouterr().err
