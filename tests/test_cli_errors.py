"""Bad input fails before any actor starts, with one message naming the culprit and a non-zero exit."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_RUN, run_cli


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("algo.bogus_key=1", "bogus_key"),
        ("learner.lr=fast", "learner.lr"),
        ("rollout.n=0", "rollout.n"),
        ("learner.lr=-1", "learner.lr"),
        ("reward.w_prm=1.5", "reward.w_prm"),
        ("algo.advantage=nope", "algo.advantage"),
        ("model.path=/no/such/model", "/no/such/model"),
    ],
)
def test_bad_config_names_the_key(tmp_path, override, culprit):
    proc = run_cli([*TINY_RUN, override, f"hydra.run.dir={tmp_path}"], timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert culprit in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    assert "started a local Ray cluster" not in out


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(
    "rows, culprit",
    [
        ([], "empty"),
        ([{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?"}], "row 2"),
    ],
)
def test_bad_dataset_names_file_and_row(tmp_path, rows, culprit):
    data = tmp_path / "train.jsonl"
    _write(data, rows)
    proc = run_cli(
        [*TINY_RUN, "task=file", f"task.train_path={data}", f"task.test_path={data}", f"hydra.run.dir={tmp_path / 'o'}"],
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert str(data) in out or data.name in out, out[-2000:]
    assert culprit in out, out[-2000:]
