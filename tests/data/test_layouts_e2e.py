"""End to end on other trainers' data and reward functions: a verl-layout parquet trains unchanged, and a
TRL-style batched reward function given as a file path scores a run on TRL conversational data."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.conftest import TINY_RUN, run_cli
from tests.data.test_layouts import write_verl_parquet


def _train_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/total" in r]


@pytest.mark.slow
def test_verl_parquet_trains_unchanged(tmp_path):
    data = write_verl_parquet(tmp_path / "gsm8k.parquet", n=6)
    out = tmp_path / "run"
    proc = run_cli(
        [
            *TINY_RUN,
            "task=file",
            f"task.train_path={data}",
            f"task.test_path={data}",
            "trainer.total_steps=1",
            f"hydra.run.dir={out}",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert [r["step"] for r in _train_rows(out)] == [1]


REWARD_FILE = '''
import json, os

def reward(prompts, completions, solution, level, **kwargs):
    """TRL-style batched: chat completions, the data set's columns as lists; logs each call's size."""
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts), prompts
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions), completions
    assert len(solution) == len(level) == len(completions)
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"n": len(completions), "level": level}) + "\\n")
    return [1.0 / (1.0 + len(c[0]["content"])) for c in completions]  # shorter is better: a real signal
'''


@pytest.mark.slow
def test_trl_batched_reward_from_a_file_scores_a_run(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": f"{i}+{i}?"}], "solution": str(2 * i), "level": i % 3}
        for i in range(8)
    ]
    data = tmp_path / "trl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "my_reward.py").write_text(textwrap.dedent(REWARD_FILE))
    log = tmp_path / "calls.jsonl"
    out = tmp_path / "run"
    proc = run_cli(
        [
            *TINY_RUN,
            "task=file",
            f"task.train_path={data}",
            "trainer.total_steps=1",
            "+reward.verifier.sources.math=custom",  # task=file's data_source: a new key
            f"reward.verifier.custom_fn={tmp_path / 'my_reward.py'}:reward",
            f"hydra.run.dir={out}",
        ],
        env={"REWARD_LOG": str(log)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(c["n"] for c in calls) == 16  # 4 prompts x 4 samples, each scored once
    assert max(c["n"] for c in calls) > 1  # batched: several samples per call
    assert all(lv in (0, 1, 2) for c in calls for lv in c["level"])
    (row,) = _train_rows(out)
    assert 0 < row["reward/total"] < 1 and row.get("verifier/unscored_frac", 0) == 0
