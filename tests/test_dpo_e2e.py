"""End to end: online DPO / TGDPO (algo=dpo|tgdpo) and offline DPO through the real actors.

A random tiny model never answers right, so every group would tie and no pair would form; the TRL-style
length reward of the verifier fixtures (shorter is better) scores every answer differently instead.
Two ZeRO-2 learner ranks (TINY_RUN), so the pairs are split over ranks.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_RUN, run_cli
from tests.test_train_e2e import FIXTURES, LENGTH_REWARD


def _train_rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "dpo/pairs" in r]


def _run(tmp_path, name: str, *overrides: str) -> list[dict]:
    out = tmp_path / name
    proc = run_cli(
        [
            *TINY_RUN,
            "reward=rule",
            "trainer.total_steps=2",
            *LENGTH_REWARD,
            *overrides,
            f"hydra.run.dir={out}",
        ],
        env={"PYTHONPATH": FIXTURES},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return _train_rows(out)


@pytest.mark.slow
def test_online_dpo_two_steps(tmp_path):
    rows = _run(tmp_path, "dpo", "algo=dpo", "algo.dpo.pair_rule=first")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # 4 prompts x 4 answers of different lengths: one pair per group
        assert r["dpo/pairs"] == 4 and r["dpo/groups_skipped"] == 0
        for key in ("dpo/loss", "dpo/margin", "dpo/accuracy", "actor/grad_norm"):
            assert key in r, key
    # step 1 trains from the reference itself: margin 0, loss log 2; step 2 sees the updated policy
    assert rows[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["dpo/loss"] == pytest.approx(0.6931, abs=1e-3)
    assert rows[1]["dpo/margin"] != pytest.approx(0.0, abs=1e-6)
    assert rows[1]["rollout/policy_version"] == 1


@pytest.mark.slow
def test_tgdpo_with_implicit_prm_guidance_two_steps(tmp_path):
    rows = _run(tmp_path, "tgdpo", "algo=tgdpo", "reward.implicit_prm.online=true")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["dpo/pairs"] >= 1
        for key in (
            "dpo/margin",
            "tgdpo/guidance_chosen",
            "tgdpo/nonpositive_weight_frac",
            "implicit_prm/token_mean",
        ):
            assert key in r, key
    # the implicit PRM starts as its own reference (guidance 0) and has learned by step 2
    assert rows[0]["tgdpo/guidance_chosen"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["tgdpo/guidance_chosen"] != pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_offline_dpo_from_a_pairs_file(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"{i} + 1 =", "chosen": f"{i + 1}", "rejected": f"{i + 2}"}) + "\n")
    rows = _run(tmp_path, "offline", "algo=dpo", f"algo.dpo.pairs_path={pairs}", "rollout.prompts_per_step=3")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["dpo/pairs"] == 3 for r in rows)
    assert [r["prompts_seen"] for r in rows] == [3, 6]
    assert rows[1]["dpo/margin"] != pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("guidance", ["qrm", "prm"])
def test_tgdpo_with_qrm_or_td_prm_guidance(tmp_path, guidance):
    """The other two guidance sources: an untrained Q-RM head (seeded random token rewards), started for
    algo=tgdpo alone, and a fresh TD-PRM (reward=tdrm; its step values' changes)."""
    prm_on = ["reward=tdrm"] if guidance == "prm" else []  # the PRM runs only when asked for
    rows = _run(tmp_path, guidance, "algo=tgdpo", f"algo.dpo.guidance={guidance}", *prm_on)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["dpo/pairs"] >= 1 and "tgdpo/guidance_chosen" in r
    if guidance == "qrm":
        assert rows[0]["tgdpo/guidance_chosen"] != pytest.approx(0.0, abs=1e-9)  # a random head is not flat
        assert "qrm/token_mean" in rows[0]
    else:
        assert "prm/tokens" in rows[0]


@pytest.mark.slow
def test_resumed_dpo_draws_the_same_pairs_as_an_uninterrupted_run(tmp_path):
    """pair_rule=random breaks ties with a generator that the checkpoint carries: 2 steps, then a resume
    to 3, ends with the weights and the step-3 pairs of a straight 3-step run. (Before the generator was
    saved, the resumed run drew step 3's pairs from the seed again, i.e. step 1's draws.)"""
    import torch
    from transformers import AutoModelForCausalLM

    parity = ["reward.verifier.sources={arith:custom}", "reward.verifier.custom_fn=reward_fixtures:trl_parity_reward"]
    common = [*TINY_RUN, "reward=rule", *parity, "algo=dpo", "algo.dpo.pair_rule=random", "algo.dpo.max_pairs_per_group=2",
              "learner.world_size=1", "trainer.save_every=1", "trainer.eval_before=false", "trainer.eval_every=0"]  # fmt: skip

    def run(out, steps, *extra):
        proc = run_cli([*common, f"trainer.total_steps={steps}", *extra, f"hydra.run.dir={out}"], env={"PYTHONPATH": FIXTURES})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, 3)
    run(resumed, 2)
    run(resumed, 3, "trainer.resume=auto")
    a, b = _train_rows(straight), _train_rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert any(r["dpo/pairs"] > 0 for r in a)
    for ra, rb in zip(a, b, strict=True):
        assert rb["dpo/pairs"] == ra["dpo/pairs"]
        assert rb["dpo/margin"] == pytest.approx(ra["dpo/margin"], abs=1e-6)
    wa = AutoModelForCausalLM.from_pretrained(straight / "checkpoint").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(resumed / "checkpoint").state_dict()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)
