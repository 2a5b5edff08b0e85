"""The FUSIONS registry: every entry is a pure function of explicit tensors, reward.fusion's choices and
needs come from it, and adding a fusion is one decorated function."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlloop.algos.fusion import (
    FUSIONS,
    Fused,
    FusionInputs,
    answer_step,
    estimate,
    place_on_last_token,
    register_fusion,
)
from rlloop.errors import RlloopError

torch.set_num_threads(1)

REWARD = SimpleNamespace(
    w_rule=1.0, w_prm=0.5, w_token=0.5, prm=SimpleNamespace(g="sigmoid"), step_process="shaping", step_norm="group",
    token_norm="none", min_temperature=0.1, first_error_threshold=0.5,
)  # fmt: skip
ALGO = SimpleNamespace(advantage="grpo", gamma=1.0, lam=1.0, adv_eps=1e-6)


def _inputs(**extra) -> FusionInputs:
    """Two groups of two rows, T = 5 (prompt column 0), two steps ending at columns 2 and 4."""
    mask = torch.tensor([[0, 1, 1, 1, 1]] * 4, dtype=torch.float32)
    outcome = torch.tensor([1.0, 0.0, 0.0, 1.0])
    x = FusionInputs(mask, torch.tensor([0, 0, 1, 1]), outcome, {"correct": (outcome, 1.0)})
    x.step_values = torch.tensor([[0.9, 0.8], [0.7, 0.2], [0.4, 0.1], [0.6, 0.9]])
    x.step_mask = torch.ones(4, 2)
    x.step_positions = torch.tensor([[2, 4]] * 4)
    x.answer_step = torch.tensor([1, -1, 0, 1])
    x.prompt_value = torch.full((4,), 0.5)
    x.token_scores = torch.linspace(-1, 1, 20).reshape(4, 5) * mask
    for k, v in extra.items():
        setattr(x, k, v)
    return x


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_every_fusion_returns_masked_tensors_and_reward_total(name):
    x = _inputs()
    out = FUSIONS[name](x, REWARD, ALGO)
    for t in (out.token_rewards, out.advantages, out.returns):
        assert t.shape == (4, 5) and torch.isfinite(t).all()
        assert (t[:, 0] == 0).all()  # nothing on the prompt column
    assert "reward/total" in out.metrics
    again = FUSIONS[name](_inputs(), REWARD, ALGO)  # pure: same inputs, same outputs
    assert torch.equal(again.advantages, out.advantages)


def test_needs_are_checked_with_the_key_to_set():
    for fusion in FUSIONS.values():
        if fusion.needs == "steps":
            with pytest.raises(RlloopError, match="reward.prm.enabled=true"):
                fusion(_inputs(step_values=None), REWARD, ALGO)
        if fusion.needs == "token_scores":
            with pytest.raises(RlloopError, match="needs a token-reward source"):
                fusion(_inputs(token_scores=None), REWARD, ALGO)
        if fusion.advantages == "own":  # no token rewards for a KL penalty to join
            with pytest.raises(RlloopError, match="takes no token rewards"):
                fusion(_inputs(kl_rewards=torch.zeros(4, 5), kl_coef=0.1), REWARD, ALGO)


def test_a_new_fusion_is_one_function_and_validate_offers_it():
    from rlloop.validate import _choose

    @register_fusion("last_token_only")
    def fuse_last(x: FusionInputs, rw, a) -> Fused:
        out = estimate(x, place_on_last_token(x.outcome, x.response_mask), a, dict(x.components))
        out.metrics = {"reward/total": float(x.outcome.mean())}
        return out

    try:
        _choose("reward.fusion", "last_token_only", FUSIONS)  # accepted: the choices are the registry's
        out = FUSIONS["last_token_only"](_inputs(), REWARD, ALGO)
        assert out.token_rewards[:, -1].tolist() == [1.0, 0.0, 0.0, 1.0]
    finally:
        del FUSIONS["last_token_only"]


def test_answer_step_is_the_step_holding_the_answer_start():
    assert answer_step([5, 12, 20], 13) == 2
    assert answer_step([5, 12, 20], 0) == 0
    assert answer_step([5, 12, 20], None) == -1
    assert answer_step([5, 12], 30) == -1  # after the last step's end: not in any step
