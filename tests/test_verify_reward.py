"""`python -m rlloop.verify_reward`: the configured reward over N rows, gold answers or given completions."""

from __future__ import annotations

import json

import pytest

from rlloop.verify_reward import main
from tests.data.test_layouts import write_verl_parquet

VERL = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(solution_str.endswith("{" + ground_truth + "}.")), "index": extra_info["index"]}
"""
OPENRLHF = """
def reward_func(queries, prompts, labels):
    return [float(q.startswith(p) and q.endswith(l)) for q, p, l in zip(queries, prompts, labels)]
"""
TRL_BUGGY = """
def reward(prompts, completions, **kwargs):
    return [1.0 / len(c[0]["content"].split("boom")[1]) for c in completions]  # crashes on most rows
"""


def _run(tmp_path, monkeypatch, capsys, *args):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["model=tiny", "task=file", "task.train_path=d.parquet", *args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def data(tmp_path):
    write_verl_parquet(tmp_path / "d.parquet", n=5)
    return tmp_path


def test_verl_function_from_a_file_scores_the_golds(data, monkeypatch, capsys):
    (data / "r.py").write_text(VERL)
    custom = ["+reward.verifier.sources={openai/gsm8k:custom}", "reward.verifier.custom_fn=r.py:compute_score"]
    code, out, _ = _run(data, monkeypatch, capsys, "--rows", "3", *custom)
    assert code == 0, out
    assert "train-2: score 1 {'index': 2.0}" in out and "3 rows: mean score 1; 0 could not be scored" in out


def test_openrlhf_function_and_given_completions(data, monkeypatch, capsys):
    (data / "r.py").write_text(OPENRLHF)
    (data / "c.jsonl").write_text(
        "".join(json.dumps({"uid": f"train-{i}", "completion": c}) + "\n" for i, c in [(1, "2"), (0, "5")])
    )
    custom = ["+reward.verifier.sources={openai/gsm8k:custom}", "reward.verifier.custom_fn=r.py:reward_func"]
    code, out, _ = _run(data, monkeypatch, capsys, "--rows", "2", "--completions", "c.jsonl", *custom)
    assert code == 0, out
    assert "train-0: score 0" in out and "train-1: score 1" in out and "mean score 0.5" in out


def test_a_crashing_reward_names_each_row_and_exits_1(data, monkeypatch, capsys):
    (data / "r.py").write_text(TRL_BUGGY)
    custom = ["+reward.verifier.sources={openai/gsm8k:custom}", "reward.verifier.custom_fn=r.py:reward"]
    code, out, _ = _run(data, monkeypatch, capsys, *custom)
    assert code == 1
    assert "train-4: score 0  [unscored: verifier error: IndexError" in out
    assert "5 rows: mean score 0; 5 could not be scored" in out


def test_bad_input_exits_2(data, monkeypatch, capsys):
    code, _, err = _run(data, monkeypatch, capsys, "reward.verifier.custom_fn=nope.py:f")
    assert code == 2 and "no such file" in err
    code, _, err = _run(data, monkeypatch, capsys, "--completions", "missing.jsonl")
    assert code == 2
