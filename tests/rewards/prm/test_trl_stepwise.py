"""TRL's stepwise-supervision format (`prompt`, `completions`, `labels`) as PRM training data."""

from __future__ import annotations

import json

import pytest

from rlloop.data.loader import DataError
from rlloop.rewards.prm.data import load_examples, load_trl_stepwise
from rlloop.rollout.steps import split_steps

ROWS = [
    {"prompt": "Which is larger, 9.8 or 9.11?",
     "completions": ["The fractional part of 9.8 is 0.8.", "0.8 > 0.11, so 9.8 is larger. "],
     "labels": [True, True]},
    {"prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": "1 + 1?"}],
     "completions": ["1 + 1 = 3", "The answer is 3."],
     "labels": [0, 0]},
]  # fmt: skip


def test_rows_become_examples_with_step_labels_and_outcome(tmp_path):
    path = tmp_path / "trl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    first, second = load_examples("trl_stepwise", path)
    assert first["prompt_text"] == "Which is larger, 9.8 or 9.11?\n\n"
    assert first["step_labels"] == [1.0, 1.0] and first["outcome"] == 1.0
    text, ends = first["response_text"], first["step_char_ends"]
    # each step ends where rlloop's own step finder ends it (the steps are joined by blank lines)
    assert ends == [e for _, e in split_steps(text)]
    assert [text[s:e] for s, e in split_steps(text)] == [
        "The fractional part of 9.8 is 0.8.",
        "0.8 > 0.11, so 9.8 is larger.",
    ]
    assert second["prompt_text"] == "Think.\n\n1 + 1?\n\n"  # chat messages: their contents
    assert second["step_labels"] == [0.0, 0.0] and second["outcome"] == 0.0


def test_parquet_and_mixed_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "Q", "completions": ["a", "b", "c"], "labels": [True, False, False]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "trl.parquet")
    (ex,) = load_trl_stepwise(tmp_path / "trl.parquet")
    assert ex["step_labels"] == [1.0, 0.0, 0.0] and ex["outcome"] == 0.0  # one wrong step: a wrong solution
    assert len(ex["step_char_ends"]) == 3


@pytest.mark.parametrize(
    "row, field, words",
    [
        ({"prompt": "Q", "completions": ["a"], "labels": [1, 0]}, "labels", "a list of 1 labels"),
        ({"prompt": "Q", "completions": ["a"], "labels": [0.5]}, "labels", "bools or 0/1"),
        ({"prompt": "Q", "completions": [], "labels": []}, "completions", "zero steps"),
        ({"prompt": "Q", "completions": ["a", " "], "labels": [1, 1]}, "completions", "step 1 is empty"),
        ({"prompt": "Q", "completions": "a", "labels": [1]}, "completions", "list of strings"),
        ({"completions": ["a"], "labels": [1]}, "prompt", "missing"),
        ({"prompt": [{"text": "x"}], "completions": ["a"], "labels": [1]}, "prompt", "messages"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, field, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "ok", "completions": ["s"], "labels": [1]}) + "\n" + json.dumps(row) + "\n"
    )
    with pytest.raises(DataError, match=rf"bad.jsonl: row 2, field '{field}'.*{words}"):
        load_trl_stepwise(path)


@pytest.mark.slow
@pytest.mark.parametrize("td", ["labels", "reach"])
def test_prm_train_on_trl_stepwise_labels(tmp_path, td):
    """`python -m rlloop.prm_train data.format=trl_stepwise td=labels` trains on TRL's per-step labels
    (td=reach: backed up against the PRM's own values)."""
    from tests.conftest import run_cli

    rows = []
    for i in range(16):
        a, b = 10 + i, 20 + i
        wrong = i % 2
        rows.append({"prompt": f"What is {a} + {b}?",
                     "completions": [f"{a} + {b} = {a + b + wrong}", f"The answer is {a + b + wrong}."],
                     "labels": [not wrong, not wrong]})  # fmt: skip
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    res = run_cli(
        ["model=tiny", "data.format=trl_stepwise", f"data.train_path={train}", "data.eval_fraction=0.25",
         f"td={td}", "lr=1e-3", "batch_size=4", f"out_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        module="rlloop.prm_train",
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "prm_metrics.json").read_text())
    assert "prm/bce" in metrics["train"] and (out / "prm" / "value_head.safetensors").is_file()
