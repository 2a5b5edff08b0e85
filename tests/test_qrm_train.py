"""`python -m rlloop.qrm_pairs` and `python -m rlloop.qrm_train` end to end on the tiny model, and bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

GOOD = {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5", "rejected": "2 + 3 = 6"}


@pytest.mark.slow
def test_pairs_then_train_end_to_end(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    res = run_cli(
        [
            "source=solutions",
            "model=tiny",
            "num_prompts=40",
            f"out_path={pairs}",
            f"hydra.run.dir={tmp_path / 'hydra_pairs'}",
        ],
        module="rlloop.qrm_pairs",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "pairs_summary.json").read_text())
    assert summary["num_pairs"] == 40
    out = tmp_path / "out"
    res = run_cli(
        [
            "model=tiny",
            f"data.train_path={pairs}",
            "data.eval_fraction=0.25",
            "lr=1e-3",
            "epochs=2",
            "batch_size=8",
            f"out_dir={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        module="rlloop.qrm_train",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pair_acc=" in res.stdout
    metrics = json.loads((out / "qrm_metrics.json").read_text())
    assert metrics["num_train_pairs"] == 30 and metrics["num_eval_pairs"] == 10
    for split in ("eval_before", "train", "eval"):
        assert set(metrics[split]) >= {"qrm/loss", "qrm/pair_acc", "qrm/margin"}, split
    assert len(metrics["history"]) == 8  # 2 epochs x ceil(30 / 8)
    assert metrics["history"][0]["qrm/loss"] != metrics["history"][-1]["qrm/loss"]

    from rlloop.rewards.qrm.service import QRMScorer

    scorer = QRMScorer(str(out / "qrm"))
    rewards = scorer.token_rewards([[1, 5, 6]], [[7, 8]])
    assert len(rewards[0]) == 2


# Held-out pair accuracy of a Q-RM trained on pairs from the default arith-small's own rollouts: measured
# 0.628 on 441 held-out pairs (1000 train prompts x 8 samples -> 3027 pairs, 2 epochs, lr 1e-4; chance
# 0.5, binomial SE 0.023); 500 prompts gave 0.587, all 1500 prompts (4544 pairs) 0.657.
QRM_HELD_OUT_BOUND = 0.58


@pytest.mark.slow
def test_qrm_from_arith_rollouts_beats_chance_on_held_out_pairs(tmp_path):
    """Pairs of a right and a wrong answer of the policy to the same prompt (train split), a Q-RM on
    the policy's backbone, and pairs from TEST-split prompts it never saw: about 6 minutes."""
    for split, prompts, seed in (("train", 1000, 0), ("test", 150, 1)):
        res = run_cli(
            [
                "model=arith-small", f"split={split}", f"num_prompts={prompts}", "n=8", "prompts_per_call=32",
                f"seed={seed}", "num_threads=2", f"out_path={tmp_path / split}.jsonl",
                f"hydra.run.dir={tmp_path / ('hydra_' + split)}",
            ],  # fmt: skip
            module="rlloop.qrm_pairs",
            timeout=900,
        )
        assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    res = run_cli(
        [
            "model=arith-small", f"data.train_path={tmp_path / 'train'}.jsonl",
            f"data.eval_path={tmp_path / 'test'}.jsonl", "epochs=2", "num_threads=2", f"out_dir={out}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],  # fmt: skip
        module="rlloop.qrm_train",
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "qrm_metrics.json").read_text())
    assert metrics["num_train_pairs"] > 2000 and metrics["num_eval_pairs"] > 300, metrics
    assert abs(metrics["eval_before"]["qrm/pair_acc"] - 0.5) < 0.1  # an untrained head is at chance
    assert metrics["eval"]["qrm/pair_acc"] > QRM_HELD_OUT_BOUND, metrics["eval"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({**GOOD, "rejected": GOOD["chosen"]}, "row 2: 'chosen' and 'rejected' are identical"),
        ({**GOOD, "chosen": ""}, "row 2: column 'chosen' is an empty completion"),
        ({"prompt": "p", "rejected": "r"}, r"row 2: missing column\(s\) \['chosen'\]"),
    ],
)
def test_bad_pair_file_fails_naming_the_row(tmp_path, row, message):
    import re

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    res = run_cli(
        ["model=tiny", f"data.train_path={path}", f"hydra.run.dir={tmp_path / 'h'}"],
        module="rlloop.qrm_train",
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert re.search(message, res.stdout + res.stderr), (res.stdout + res.stderr)[-2000:]
    assert "Traceback" not in res.stdout + res.stderr


def test_bad_options_fail_with_the_key(tmp_path):
    res = run_cli(
        ["source=rollouts_file", f"hydra.run.dir={tmp_path / 'h'}"], module="rlloop.qrm_pairs", timeout=120
    )
    assert res.returncode == 2 and "rollouts_path" in res.stdout + res.stderr, res.stderr[-2000:]
    res = run_cli(
        ["data.train_path=x.jsonl", "qrm_init=bogus", f"hydra.run.dir={tmp_path / 'h2'}"],
        module="rlloop.qrm_train",
        timeout=120,
    )
    assert res.returncode == 2 and "qrm_init" in res.stdout + res.stderr, res.stderr[-2000:]
