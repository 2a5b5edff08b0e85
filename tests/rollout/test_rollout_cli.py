"""`python -m rlloop.rollout` writes verified rollouts that the PRM trainer's loader reads back."""

from __future__ import annotations

import json

from rlloop.rewards.prm.data import load_rollouts
from tests.conftest import run_cli


def test_rollout_cli_writes_loadable_verified_rollouts_with_mc_labels(tmp_path):
    out = tmp_path / "ro.jsonl"
    proc = run_cli(
        [
            "model=tiny",
            "num_prompts=2",
            "rollout.n=2",
            "rollout.max_new_tokens=16",
            "mc_samples=2",
            f"out={out}",
            f"hydra.run.dir={tmp_path}",
        ],
        module="rlloop.rollout",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {r["group"] for r in rows} == {"arith-train-0", "arith-train-1"}
    for r in rows:
        assert r["correct"] in (0.0, 1.0) and len(r["rollout_logprobs"]) == len(r["response_ids"])
        if r["step_ends"]:
            assert len(r["step_labels"]) == len(r["step_ends"])
            assert all(0.0 <= x <= 1.0 for x in r["step_labels"])
    assert len(load_rollouts(out)) == sum(1 for r in rows if r["step_char_ends"])


def test_rollout_cli_rejects_a_bad_split(tmp_path):
    proc = run_cli(
        ["model=tiny", "split=dev", f"out={tmp_path / 'x.jsonl'}", f"hydra.run.dir={tmp_path}"],
        module="rlloop.rollout",
        timeout=300,
    )
    assert proc.returncode == 2 and "split='dev'" in proc.stdout + proc.stderr
