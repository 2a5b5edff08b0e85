"""End to end: the dense token-reward sources in `rlloop.train` — Q-RM (reward=qrm, fusion=token) and
PRIME's implicit PRM updated online (reward=prime) — on the tiny model, through every actor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FIXTURES, LENGTH_REWARD, TINY_RUN, run_cli

SHORT = [
    *TINY_RUN,
    *LENGTH_REWARD,
    "trainer.total_steps=2",
    "learner.world_size=1",
    "trainer.eval_before=false",
]
ENV = {"PYTHONPATH": FIXTURES}


def _train_rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/total" in r]


def test_qrm_token_rewards_drive_reinforce_pp(tmp_path):
    """Q-RM (policy backbone + seeded head) scores every response token; token fusion with std
    normalisation feeds REINFORCE++, and each source's statistics reach metrics.jsonl."""
    out = tmp_path / "run"
    proc = run_cli([*SHORT, "reward=qrm", "algo=reinforce_pp", f"hydra.run.dir={out}"], env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("qrm/token_mean", "qrm/token_std", "fusion/token_sum/mean", "fusion/token_sum/std"):
            assert key in r, f"metrics.jsonl lacks {key}"
        assert "fusion/token_sum/corr_outcome" in r
        assert r["qrm/token_std"] > 0  # a real (random-head) scorer, not zeros
        # reward/total is the mean fused row reward: w_rule * outcome + w_token * Σ_t s_t / std
        assert r["reward/total"] == pytest.approx(
            r["fusion/outcome/mean"] + 0.1 * r["fusion/token_sum/mean"], rel=1e-4, abs=1e-5
        )
        assert r["time/token_rewards"] > 0
    assert "Q-RM: no trained Q-RM given" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_prime_implicit_prm_learns_online_and_resumes(tmp_path):
    """reward=prime: π_φ (from the policy) scores, then takes a CE step on each batch's outcomes; its
    weights move (logged distance from π_ref, saved folder differs from the init) and a resumed run
    continues from the checkpointed π_φ, not from the initial weights."""
    out = tmp_path / "run"
    prime = ["reward=prime", "reward.implicit_prm.prompt_filter=false", "reward.implicit_prm.lr=1e-3"]
    proc = run_cli([*SHORT, *prime, "trainer.save_every=1", f"hydra.run.dir={out}"], env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["implicit_prm/version"] for r in rows] == [1.0, 2.0]  # one CE step per RL step
    # π_φ = π_ref at the first scoring, so its token rewards are exactly 0 there; after a step they are not.
    assert rows[0]["implicit_prm/token_std"] == 0 and rows[1]["implicit_prm/token_std"] > 0
    assert 0 < rows[0]["implicit_prm/param_delta_norm"] < rows[1]["implicit_prm/param_delta_norm"]
    for r in rows:
        assert {"implicit_prm/loss", "fusion/token_sum/mean", "fusion/outcome/mean"} <= r.keys()
    summary = json.loads((out / "summary.json").read_text())
    init = load_file(f"{summary['model_path']}/model.safetensors")
    trained = load_file(str(out / "implicit_prm" / "model.safetensors"))
    changed = [k for k, v in init.items() if not torch.allclose(v.float(), trained[k].float())]
    assert len(changed) >= len(init) // 2, f"only {len(changed)}/{len(init)} implicit-PRM tensors changed"
    step1 = out / "checkpoints" / "step_000001"
    assert (step1 / "implicit_prm" / "model.safetensors").is_file()

    again = tmp_path / "resumed"
    proc = run_cli(
        [*SHORT, *prime, f"trainer.resume={step1}", "trainer.save_final=false", f"hydra.run.dir={again}"],
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    resumed = _train_rows(again)
    assert [r["step"] for r in resumed] == [2]
    assert resumed[0]["implicit_prm/token_std"] > 0  # scored by the checkpointed π_φ ≠ π_ref
