"""Preference-pair files (bad rows fail naming the row) and pairs built from rollouts and solutions."""

from __future__ import annotations

import json
import random

import pytest

from rlloop.data.loader import DataError
from rlloop.rewards.qrm.data import (
    corrupt_solution,
    load_pairs,
    pairs_from_rollouts,
    pairs_from_solutions,
    write_pairs,
)
from rlloop.tasks.arith import generate_problems, solution_text

GOOD = {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5", "rejected": "2 + 3 = 6"}


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_pairs_good_rows(tmp_path):
    messages = [{"role": "user", "content": "hi"}]
    path = write_rows(tmp_path / "p.jsonl", [GOOD, {**GOOD, "prompt": messages, "group": "g1"}])
    pairs = load_pairs(path)
    assert [p["group"] for p in pairs] == ["What is 2 + 3?", "g1"]
    assert pairs[1]["prompt"] == messages


@pytest.mark.parametrize(
    "bad, message",
    [
        ({**GOOD, "rejected": GOOD["chosen"]}, "row 3: 'chosen' and 'rejected' are identical"),
        ({**GOOD, "chosen": "  "}, "row 3: column 'chosen' is an empty completion"),
        ({**GOOD, "rejected": ""}, "row 3: column 'rejected' is an empty completion"),
        ({"prompt": "p", "chosen": "a"}, r"row 3: missing column\(s\) \['rejected'\]"),
        ({"chosen": "a", "rejected": "b"}, r"row 3: missing column\(s\) \['prompt'\]"),
        ({**GOOD, "chosen": 5}, "row 3: column 'chosen' must be text"),
        ({**GOOD, "prompt": [{"role": "user"}]}, "row 3: column 'prompt' is a list but not"),
        ([1, 2], "row 3: expected an object"),
    ],
)
def test_bad_rows_name_the_row(tmp_path, bad, message):
    path = write_rows(tmp_path / "p.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError, match=message):
        load_pairs(path)


def test_bad_parquet_row_and_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "rejected": GOOD["chosen"]}]), path)
    with pytest.raises(DataError, match="p.parquet: row 2: 'chosen' and 'rejected' are identical"):
        load_pairs(path)
    with pytest.raises(DataError, match="no such pair file"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_pairs(tmp_path / "empty.jsonl")


def test_pairs_from_rollouts_pairs_right_with_wrong_of_the_same_prompt(tmp_path):
    rollouts = [
        {"group": "a", "prompt": "P_a", "text": "right 1", "correct": 1.0},
        {"group": "a", "prompt": "P_a", "text": "wrong 1", "correct": 0.0},
        {"group": "a", "prompt": "P_a", "text": "wrong 2", "correct": 0.0},
        {"group": "a", "prompt": "P_a", "text": "wrong 2", "correct": 0.0},  # duplicate text
        {"group": "b", "prompt": "P_b", "text": "all right", "correct": 1.0},  # no wrong one: no pair
        {"group": "c", "prompt": "P_c", "text": "x", "correct": 0.0},
        {"group": "c", "prompt": "P_c", "text": "y", "correct": 1.0},
    ]
    pairs = pairs_from_rollouts(rollouts, max_pairs_per_prompt=4)
    assert sorted((p["group"], p["chosen"], p["rejected"]) for p in pairs) == [
        ("a", "right 1", "wrong 1"),
        ("a", "right 1", "wrong 2"),
        ("c", "y", "x"),
    ]
    assert all(p["prompt"] == f"P_{p['group']}" for p in pairs)
    assert len(pairs_from_rollouts(rollouts, max_pairs_per_prompt=1)) == 2
    # written pairs load back through the validating loader
    assert len(load_pairs(write_pairs(pairs, tmp_path / "out.jsonl"))) == 3
    with pytest.raises(DataError, match="rollout 0 .* has no 'correct'"):
        pairs_from_rollouts([{"group": "a", "prompt": "p", "text": "t"}])


@pytest.mark.parametrize("kind", ["result", "copy"])
def test_corrupted_solution_has_one_wrong_number_and_a_wrong_answer(kind):
    rng = random.Random(0)
    for p in generate_problems(50, seed=3, max_ops=3):
        text, start, end = corrupt_solution(p.steps, p.answer, rng, kind)
        good = solution_text(p)
        assert text != good and f"\\boxed{{{p.answer}}}" not in text
        # everything before the wrong number is the worked solution; the wrong number is a number
        assert text[:start] == good[:start] and text[start:end].isdigit()
        assert good[start:end] != text[start:end] or good[end : end + 1].isdigit()
        if kind == "result":
            assert text[start - 3 : start] == " = "
        else:
            assert text[start - 2 : start] == "\n\n"


def test_pairs_from_solutions_records_the_error_span():
    problems = generate_problems(5, seed=1)
    pairs = pairs_from_solutions(problems, [f"Q{i}" for i in range(5)], groups=[f"g{i}" for i in range(5)])
    assert [p["group"] for p in pairs] == [f"g{i}" for i in range(5)]
    for p in pairs:
        assert p["rejected"][p["error_start"] : p["error_end"]].isdigit()
