"""End to end on the chain task: the oracle PRM (the step checker's exact labels) through min fusion."""

from __future__ import annotations

import json

from tests.conftest import TINY_RUN, run_cli


def test_oracle_prm_with_min_fusion_on_chain(tmp_path):
    """reward.prm.oracle gives step values without a PRM service; fusion=min turns them into advantages;
    the step values in samples.jsonl are exactly the oracle's 0/1 labels."""
    out = tmp_path / "run"
    proc = run_cli(
        [
            *TINY_RUN,
            "task=chain",
            "reward.prm.oracle=true",
            "reward.fusion=min",
            "reward.w_prm=1.0",
            "reward.w_rule=0.1",
            "rollout.max_new_tokens=16",
            "learner.world_size=1",
            "trainer.total_steps=2",
            "trainer.eval_before=false",
            "trainer.log_samples_every=1",
            f"hydra.run.dir={out}",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward/total" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert "fusion/prm_min_weighted_sum/mean" in r
        assert "time/prm_wait" not in r  # no PRM service ran
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    values = [v for s in samples for v in (s.get("step_values") or [])]
    assert values and set(values) <= {0.0, 1.0}
