"""`python -m rlloop.prm_train` end to end on a tiny trajectory set, and its bad-input errors."""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import run_cli


def write_trajectories(path, n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(10, 40), rng.randint(10, 40)
            good = i % 2 == 0
            answer = a + b if good else a + b + rng.randint(1, 9)
            steps = [
                f"Sam starts with {a} marbles.",
                f"{a} + {b} = {answer}",
                f"The answer is \\boxed{{{answer}}}.",
            ]
            f.write(
                json.dumps(
                    {"question": f"Sam has {a} marbles and gets {b} more.", "steps": steps, "correct": good}
                )
                + "\n"
            )
    return str(path)


@pytest.mark.slow
def test_prm_train_cli_end_to_end(tmp_path):
    train = write_trajectories(tmp_path / "train.jsonl", 32)
    evals = write_trajectories(tmp_path / "eval.jsonl", 8, seed=1)
    out = tmp_path / "out"
    res = run_cli(
        [
            "model=tiny",
            "data.format=trajectories",
            f"data.train_path={train}",
            f"data.eval_path={evals}",
            "td=td0",
            "lr=1e-3",
            "epochs=2",
            "batch_size=8",
            f"out_dir={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        module="rlloop.prm_train",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "prm_metrics.json").read_text())
    for split in ("eval_before", "train", "eval"):
        for key in ("prm/bce", "prm/v_last_acc", "prm/auroc", "prm/smoothness"):
            assert key in metrics[split], (split, key)
    assert len(metrics["history"]) == 8  # 2 epochs x 32/8 steps
    assert metrics["history"][-1]["prm/loss"] < metrics["history"][0]["prm/loss"]
    from rlloop.rewards.prm.service import PRMScorer

    scorer = PRMScorer(str(out / "prm"), require_value_head=True)
    scored = scorer.score(["Q\n\n"], ["a.\n\nb."])
    assert len(scored[0]["step_values"]) == 2
    assert "auroc=" in res.stdout


def make_cfg(**overrides):
    from omegaconf import OmegaConf

    from rlloop.prm_train import PRMTrainConfig

    return OmegaConf.merge(
        OmegaConf.structured(PRMTrainConfig),
        OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]),
    )


def test_prm_train_bad_inputs_in_process(tmp_path):
    from rlloop.errors import RlloopError
    from rlloop.prm_train import train

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "steps": ["a"], "correct": 1}) + "\n")
    bad.write_text(bad.read_text() + json.dumps({"question": "q", "steps": [], "correct": 1}) + "\n")
    with pytest.raises(RlloopError, match=r"bad\.jsonl: row 2, field 'steps': trajectory has zero steps"):
        train(make_cfg(**{"model.name": "tiny", "data.train_path": str(bad)}), str(tmp_path))

    good = write_trajectories(tmp_path / "good.jsonl", 4)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    with pytest.raises(RlloopError, match=r"prm_init=prm but model.path: .*plain is not a PRM folder"):
        train(
            make_cfg(**{"prm_init": "prm", "model.path": str(plain), "data.train_path": good}), str(tmp_path)
        )
    with pytest.raises(RlloopError, match=r"transitions files train td0/nstep only"):
        train(
            make_cfg(**{"td": "td_lambda", "data.format": "transitions", "data.train_path": good}),
            str(tmp_path),
        )
    # td=reach backs up per-step hard labels: rows without them are named
    with pytest.raises(RlloopError, match=r"td=reach but example 0 \(0-based\) has no step_labels"):
        train(make_cfg(**{"td": "reach", "model.name": "tiny", "data.train_path": good}), str(tmp_path))


def test_prm_train_cli_error_exit_code(tmp_path):
    good = write_trajectories(tmp_path / "good.jsonl", 4)
    res = run_cli(
        ["td=td9", f"data.train_path={good}", f"hydra.run.dir={tmp_path / 'h'}"], module="rlloop.prm_train"
    )
    assert res.returncode == 2 and "td='td9'" in res.stderr + res.stdout
