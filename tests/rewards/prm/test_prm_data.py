"""PRM data loaders: the three formats load; bad rows fail naming file, row and field."""

from __future__ import annotations

import json

import pytest

from rlloop.data.loader import DataError
from rlloop.rewards.prm.data import load_rollouts, load_trajectories, load_transitions


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ONE_STEP = {
    "question": "1+1?",
    "state1": "Step 1: 1+1=2",
    "state2": "Step 1: 1+1=2\n\nStep 2: done",
    "reward": 0.0,
    "label": 1,
    "done": 0,
}
TWO_STEP = {
    "conversations": {
        "question": "1+1?",
        "state1": "",
        "state3": "a\n\nb",
        "reward_1": 0.1,
        "reward_2": 0.0,
        "label": 0,
        "done": 0,
        "state3_mask": 1,
    }
}


def test_transitions_jsonl_and_parquet(tmp_path):
    rows = load_transitions(
        write_jsonl(tmp_path / "t.jsonl", [ONE_STEP, {**ONE_STEP, "done": 1, "state2": None}])
    )
    assert rows[0]["n"] == 1 and rows[0]["next_state"].endswith("done") and rows[0]["rewards"] == [0.0]
    assert rows[1]["done"] and rows[1]["next_state"] is None
    two = load_transitions(write_jsonl(tmp_path / "t2.jsonl", [TWO_STEP]))[0]
    assert two["n"] == 2 and two["rewards"] == [0.1, 0.0] and two["state"] == "" and two["next_mask"] == 1.0
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([ONE_STEP, ONE_STEP]), tmp_path / "t.parquet")
    assert len(load_transitions(tmp_path / "t.parquet")) == 2


@pytest.mark.parametrize(
    ("row", "field", "what"),
    [
        ({k: v for k, v in ONE_STEP.items() if k != "label"}, "label", "missing"),
        ({**ONE_STEP, "label": 1.5}, "label", "outside"),
        ({**ONE_STEP, "label": -0.1}, "label", "outside"),
        ({k: v for k, v in ONE_STEP.items() if k != "state2"}, "state2", "missing"),
        ({k: v for k, v in ONE_STEP.items() if k != "question"}, "question", "missing"),
        ({**ONE_STEP, "reward": "x"}, "reward", "finite number"),
        ({**ONE_STEP, "done": 0.5}, "done", "0/1"),
    ],
)
def test_transition_errors_name_file_row_field(tmp_path, row, field, what):
    path = write_jsonl(tmp_path / "bad.jsonl", [ONE_STEP, row])
    with pytest.raises(DataError) as e:
        load_transitions(path)
    msg = str(e.value)
    assert str(path) in msg and "row 2" in msg and f"field {field!r}" in msg and what in msg


def test_transition_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{k: v for k, v in ONE_STEP.items() if k != "done"}]), tmp_path / "x.parquet"
    )
    with pytest.raises(DataError, match=r"x\.parquet: row 1, field 'done': missing"):
        load_transitions(tmp_path / "x.parquet")


def test_trajectories(tmp_path):
    path = write_jsonl(
        tmp_path / "traj.jsonl",
        [
            {"question": "Q?", "steps": ["a = 1", "b = 2", "\\boxed{3}"], "correct": True},
            {"question": "Q?", "steps": ["x"], "correct": 0, "step_labels": [0.25]},
        ],
    )
    ex = load_trajectories(path)
    assert ex[0]["response_text"] == "a = 1\n\nb = 2\n\n\\boxed{3}"
    assert [ex[0]["response_text"][:e] for e in ex[0]["step_char_ends"]][-2:] == [
        "a = 1\n\nb = 2",
        ex[0]["response_text"],
    ]
    assert ex[0]["outcome"] == 1.0 and ex[1]["outcome"] == 0.0 and ex[1]["step_labels"] == [0.25]
    bad = write_jsonl(
        tmp_path / "zero.jsonl",
        [{"question": "Q?", "steps": ["a"], "correct": 1}, {"question": "Q?", "steps": [], "correct": 1}],
    )
    with pytest.raises(DataError, match=r"zero\.jsonl: row 2, field 'steps': trajectory has zero steps"):
        load_trajectories(bad)
    bad = write_jsonl(tmp_path / "lab.jsonl", [{"question": "Q?", "steps": ["a"], "correct": 2}])
    with pytest.raises(DataError, match=r"row 1, field 'correct'.*outside"):
        load_trajectories(bad)


def test_rollouts(tmp_path):
    base = {
        "uid": "p/0",
        "group": "p",
        "prompt_text": "<|user|>Q",
        "text": "1 + 2 = 3\n\n\\boxed{3}",
        "step_char_ends": [9, 20],
        "correct": 1,
    }
    ex = load_rollouts(
        write_jsonl(
            tmp_path / "r.jsonl",
            [base, {**{k: v for k, v in base.items() if k != "correct"}, "outcome": {"math": 0.0}}],
        )
    )
    assert ex[0]["outcome"] == 1.0 and ex[1]["outcome"] == 0.0 and ex[0]["step_char_ends"] == [9, 20]
    no_ends = {k: v for k, v in base.items() if k != "step_char_ends"}
    assert load_rollouts(write_jsonl(tmp_path / "r2.jsonl", [no_ends]))[0]["step_char_ends"] == [9, 20]
    with pytest.raises(DataError, match=r"row 1, field 'text': rollout has zero steps"):
        load_rollouts(write_jsonl(tmp_path / "r3.jsonl", [{**no_ends, "text": "  "}]))
    with pytest.raises(DataError, match=r"row 1, field 'correct': missing"):
        load_rollouts(write_jsonl(tmp_path / "r4.jsonl", [{k: v for k, v in base.items() if k != "correct"}]))
    with pytest.raises(DataError, match=r"row 1: not valid JSON"):
        (tmp_path / "r5.jsonl").write_text("{oops\n")
        load_rollouts(tmp_path / "r5.jsonl")
