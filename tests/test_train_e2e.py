"""End to end: every actor for real (rollout worker, verifier pool, PRM service, 2 DeepSpeed ranks)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT, TINY_RUN, run_cli

# A random tiny model never answers right, so every GRPO advantage would be 0 and nothing could change.
# A TRL-style length reward from the verifier fixtures (wired by config alone) gives a real signal.
FIXTURES = str(ROOT / "tests" / "rewards" / "verifiers")
LENGTH_REWARD = [
    "reward.verifier.sources={arith:custom}",
    "reward.verifier.custom_fn=reward_fixtures:trl_len_reward",
]

REQUIRED_KEYS = {
    "step",
    "reward/total",
    "reward/rule",
    "accuracy",
    "response_length/mean",
    "kl",
    "entropy",
    "time/generate",
    "time/verify",
    "time/prm",
    "time/learner",
    "time/sync",
    "time/step",
    "time/idle",
    "time/overhead_frac",
}
MEM_KEYS = {"mem/controller_rss_gb", "mem/rollout_rss_gb", "mem/learner_rss_gb", "mem/verifier_rss_gb"}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_steps_through_every_actor(tmp_path, zero_stage):
    out = tmp_path / "run"
    proc = run_cli(
        [
            *TINY_RUN,
            "trainer.total_steps=2",
            "trainer.eval_samples=2",
            f"learner.zero_stage={zero_stage}",
            "learner.world_size=2",
            "reward=tdrm",
            *LENGTH_REWARD,
            f"hydra.run.dir={out}",
        ],
        env={"PYTHONPATH": FIXTURES},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/total" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert any(r["reward/total"] > 0 for r in train_rows)
    for r in train_rows:
        missing = REQUIRED_KEYS - r.keys()
        assert not missing, f"metrics.jsonl lacks {missing}"
        assert r["time/step"] > 0
        assert 0.0 <= r["time/overhead_frac"] <= 1.0
        assert 0.0 <= r["time/idle"] <= r["time/step"]
    # Peak RSS per role on the last step (reward=tdrm: the PRM service too); a real process holds a model.
    mem = {k: v for k, v in train_rows[-1].items() if k.startswith("mem/")}
    assert MEM_KEYS | {"mem/prm_rss_gb"} <= mem.keys(), mem
    assert all(0.05 < v < 64 for v in mem.values()), mem
    # Step 1 samples with the initial weights (version 0); step 2 with the weights after update 1.
    assert train_rows[0]["rollout/policy_version"] == 0
    assert train_rows[1]["rollout/policy_version"] == 1
    evals = [r for r in rows if r.get("eval/accuracy") is not None]
    assert [r["step"] for r in evals] == [0, 2]
    assert all(0.0 <= r["eval/accuracy_sampled"] <= 1.0 for r in evals), evals
    # The final checkpoint loads with plain transformers and differs from the initial weights.
    ckpt = out / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    cfg = (out / "config_resolved.yaml").read_text()
    assert f"zero_stage: {zero_stage}" in cfg
    summary_line = [ln for ln in proc.stdout.splitlines() if ln.startswith("held-out accuracy")]
    assert summary_line and "sampled at the training temperature" in summary_line[0], proc.stdout[-2000:]
    model_path = json.loads((out / "summary.json").read_text())["model_path"]
    init = load_file(f"{model_path}/model.safetensors")
    trained = model.state_dict()
    changed = [
        k for k, v in init.items() if k in trained and not torch.allclose(v.float(), trained[k].float())
    ]
    assert len(changed) >= len(init) // 2, f"only {len(changed)}/{len(init)} tensors changed"
    assert (out / "training.png").stat().st_size > 1000


@pytest.mark.slow
def test_step_fusion_with_online_td_prm_changes_policy_and_prm(tmp_path):
    """GRPO with `step` fusion and the PRM TD-updated online (actor-critic): both models learn."""
    out = tmp_path / "run"
    proc = run_cli(
        [
            *TINY_RUN,
            "trainer.total_steps=2",
            "learner.world_size=1",
            "trainer.eval_before=false",
            "reward=tdrm",
            "reward.fusion=step",
            "reward.w_prm=0.5",
            "reward.prm.online=true",
            "reward.prm.lr=1e-2",
            *LENGTH_REWARD,
            f"hydra.run.dir={out}",
        ],
        env={"PYTHONPATH": FIXTURES},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/total" in r]
    assert len(train_rows) == 2
    for r in train_rows:
        assert r["prm/version"] == r["step"]  # one TD step per RL step
        assert "prm/loss" in r and "fusion/prm_shaping_sum/mean" in r
    summary = json.loads((out / "summary.json").read_text())
    init = load_file(f"{summary['model_path']}/model.safetensors")
    policy = AutoModelForCausalLM.from_pretrained(out / "checkpoint").state_dict()
    assert any(not torch.allclose(v.float(), policy[k].float()) for k, v in init.items() if k in policy)
    head = load_file(str(out / "prm" / "value_head.safetensors"))
    assert any(float(t.abs().max()) > 0 for t in head.values())  # the fresh head starts at exactly 0
