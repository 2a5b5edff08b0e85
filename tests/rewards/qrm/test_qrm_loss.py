"""Q-RM math against hand-worked numbers: the pairwise loss, accuracy and token-reward normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from rlloop.algos.fusion import token_fusion
from rlloop.rewards.qrm.loss import (
    eos_reward_to_mean,
    pair_accuracy,
    qrm_pair_loss,
    qrm_pair_margin,
    qrm_token_rewards,
)


def test_pair_loss_hand_worked():
    # chosen completion tokens s = 1, 2, 3 (mean 2), prompt token (masked) 100 must not count;
    # rejected s = 0, 1 (mean 0.5) plus a pad. Δ = 1.5; x = 0.2 * 1.5 - 2 = -1.7; L = log(1 + e^1.7).
    s_c = torch.tensor([[100.0, 1.0, 2.0, 3.0]])
    m_c = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    s_r = torch.tensor([[100.0, 0.0, 1.0, -50.0]])
    m_r = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss, margin = qrm_pair_loss(s_c, m_c, s_r, m_r)
    assert margin.tolist() == [1.5]
    assert float(loss) == pytest.approx(math.log(1 + math.exp(1.7)), abs=1e-6)  # 1.8674
    assert float(loss) == pytest.approx(1.867786, abs=1e-5)


def test_pair_loss_batch_mean_and_parameters():
    # pair 0: Δ = 10 -> x = 1*10 - 0 = 10; pair 1: Δ = -2 -> x = -2 (beta 1, gamma 0)
    s_c = torch.tensor([[10.0, 10.0], [0.0, 0.0]])
    s_r = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    ones = torch.ones(2, 2)
    loss, margin = qrm_pair_loss(s_c, ones, s_r, ones, beta=1.0, gamma=0.0)
    expect = (math.log1p(math.exp(-10)) + math.log1p(math.exp(2))) / 2
    assert float(loss) == pytest.approx(expect, abs=1e-6)
    assert pair_accuracy(margin) == 0.5
    # untrained head (s = 0): L = log(1 + e^γ) = 2.1269 at the released γ = 2
    zero = torch.zeros(1, 3)
    assert float(qrm_pair_loss(zero, torch.ones(1, 3), zero, torch.ones(1, 3))[0]) == pytest.approx(
        math.log1p(math.exp(2.0)), abs=1e-6
    )


def test_pair_loss_extreme_margin_is_finite_and_has_gradient():
    s_c = torch.tensor([[-1e4]], requires_grad=True)
    loss, _ = qrm_pair_loss(s_c, torch.ones(1, 1), torch.tensor([[1e4]]), torch.ones(1, 1))
    loss.backward()
    assert math.isfinite(float(loss)) and float(loss) == pytest.approx(0.2 * 2e4 + 2.0)
    assert float(s_c.grad) == pytest.approx(-0.2)  # dL/ds = -β / n_tokens at a saturated sigmoid


def test_empty_completion_names_the_row():
    s = torch.zeros(2, 3)
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="rejected: row 1 has no completion tokens"):
        qrm_pair_margin(s, torch.ones(2, 3), s, m)


def test_token_reward_normalisation_hand_worked():
    # action tokens: 1, 3 (row 0) and -2, 2 (row 1); prompt/pad entries (7, 9) are ignored and zeroed.
    s = torch.tensor([[7.0, 1.0, 3.0], [9.0, -2.0, 2.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    # mean 1, squared deviations 0 + 4 + 9 + 1 = 14, unbiased var 14/3 -> std 2.1602; no mean subtraction
    std = math.sqrt(14 / 3)
    r = qrm_token_rewards(s, mask)
    expect = torch.tensor([[0.0, 1 / std, 3 / std], [0.0, -2 / std, 2 / std]])
    torch.testing.assert_close(r, expect)
    # the fusion step's token_norm="std" divides by the same std (w_rule 0 isolates the token part)
    fused = token_fusion(torch.zeros(2), s, mask, w_rule=0.0, w_token=1.0, token_norm="std")
    torch.testing.assert_close(fused, expect)


def test_eos_reward_replaced_by_row_mean():
    r = torch.tensor([[0.0, 1.0, 2.0, 9.0], [0.0, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    out = eos_reward_to_mean(r, mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 2.0, 4.0], [0.0, 4.0, 0.0, 0.0]]))
