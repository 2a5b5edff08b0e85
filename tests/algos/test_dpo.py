"""DPO / TGDPO losses and pair building (rlloop.algos.dpo) against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from rlloop.algos.dpo import (
    dpo_loss,
    guidance_stats,
    interleave_pairs,
    preference_loss,
    preference_pairs,
    spread_step_rewards,
    tgdpo_loss,
)


def _nll(z: float) -> float:
    """-log sigma(z)."""
    return math.log1p(math.exp(-z))


# one pair, T = 3 columns; column 0 is the prompt (mask 0)
LR_W = torch.tensor([[9.0, 0.5, -0.2]])  # log pi - log pi_ref of the chosen tokens
LR_L = torch.tensor([[9.0, 0.1, 0.3]])
MASK = torch.tensor([[0.0, 1.0, 1.0]])


def test_dpo_by_hand():
    loss, h_w, h_l = dpo_loss(LR_W, LR_L, MASK, MASK, beta=0.1)
    # h_w = 0.1 * (0.5 - 0.2) = 0.03 ; h_l = 0.1 * (0.1 + 0.3) = 0.04
    assert h_w.item() == pytest.approx(0.03)
    assert h_l.item() == pytest.approx(0.04)
    assert loss.item() == pytest.approx(_nll(0.03 - 0.04))


def test_tgdpo_by_hand():
    g_w = torch.tensor([[0.0, 2.0, -1.0]])
    g_l = torch.tensor([[0.0, -2.0, 1.0]])
    loss, h_w, h_l = tgdpo_loss(LR_W, LR_L, MASK, MASK, g_w, g_l, beta=0.1, alpha=0.5)
    # chosen weights f_w = 1 + 0.5 g: (2, 0.5) -> h_w = 0.1 * (2 * 0.5 + 0.5 * -0.2) = 0.09
    # rejected weights f_l = 1 - 0.5 g: (2, 0.5) -> h_l = 0.1 * (2 * 0.1 + 0.5 * 0.3) = 0.035
    assert h_w.item() == pytest.approx(0.09)
    assert h_l.item() == pytest.approx(0.035)
    assert loss.item() == pytest.approx(_nll(0.09 - 0.035))


def test_tgdpo_with_zero_guidance_is_dpo_exactly():
    torch.manual_seed(0)
    lr_w, lr_l = torch.randn(5, 7), torch.randn(5, 7)
    m_w, m_l = (torch.rand(5, 7) > 0.3).float(), (torch.rand(5, 7) > 0.3).float()
    zero = torch.zeros(5, 7)
    ref = dpo_loss(lr_w, lr_l, m_w, m_l, beta=0.1)
    for guided in (
        tgdpo_loss(lr_w, lr_l, m_w, m_l, zero, zero, beta=0.1, alpha=0.5),
        tgdpo_loss(lr_w, lr_l, m_w, m_l, torch.randn(5, 7), torch.randn(5, 7), beta=0.1, alpha=0.0),
        tgdpo_loss(lr_w, lr_l, m_w, m_l, None, None, beta=0.1, alpha=0.5),
    ):
        for a, b in zip(guided, ref, strict=True):
            assert torch.equal(a, b)


def test_tgdpo_matches_the_released_formula():
    """The authors' line: -logsigmoid((b (1 + a b lr^w) l^w).sum(-1) - (b (1 - a b lr^l) l^l).sum(-1)),
    lr^ the guidance model's log-ratio; here the guidance is passed as r^ = b * lr^."""
    torch.manual_seed(1)
    b, a = 0.1, 0.5
    pol_w, pol_l = torch.randn(3, 4), torch.randn(3, 4)
    rm_w, rm_l = torch.randn(3, 4), torch.randn(3, 4)
    released = -torch.nn.functional.logsigmoid(
        (b * (1 + a * b * rm_w) * pol_w).sum(-1) - (b * (1 - a * b * rm_l) * pol_l).sum(-1)
    )
    ones = torch.ones(3, 4)
    ours, _, _ = tgdpo_loss(pol_w, pol_l, ones, ones, b * rm_w, b * rm_l, beta=b, alpha=a)
    torch.testing.assert_close(ours, released)


def test_tgdpo_gradient_weights_tokens_by_guidance():
    """d h_w / d l^w_t = beta f_w(r^_t): a token the guidance likes is pushed harder."""
    lr_w = torch.zeros(1, 2, requires_grad=True)
    loss, _, _ = tgdpo_loss(
        lr_w, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), torch.tensor([[1.0, -1.0]]), None,
        beta=1.0, alpha=0.5,
    )  # fmt: skip
    loss.sum().backward()
    # at margin 0, d(-log sigma(z))/dz = -0.5; f_w = (1.5, 0.5)
    torch.testing.assert_close(lr_w.grad, torch.tensor([[-0.75, -0.25]]))


def test_preference_loss_on_interleaved_rows_skips_padding_pairs():
    logprobs = torch.tensor([[0.0, -1.0], [0.0, -2.0], [0.0, -1.0], [0.0, -1.0]])
    ref = torch.tensor([[0.0, -1.5], [0.0, -1.5], [0.0, -1.0], [0.0, -1.0]])
    mask = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # pair 1 is padding
    losses, values = preference_loss("dpo", logprobs, ref, mask, beta=1.0)
    assert losses.shape == (1,)
    # l_w = 0.5, l_l = -0.5 -> margin 1
    assert values["margin"].tolist() == [pytest.approx(1.0)]
    assert values["chosen_reward"].tolist() == [pytest.approx(0.5)]
    assert values["rejected_reward"].tolist() == [pytest.approx(-0.5)]
    assert losses.item() == pytest.approx(_nll(1.0))
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss("ppo", logprobs, ref, mask, beta=1.0)
    with pytest.raises(ValueError, match="pairs"):
        preference_loss("dpo", logprobs[:3], ref[:3], mask[:3], beta=1.0)


def test_guidance_stats():
    g = torch.tensor([[0.0, 4.0], [0.0, 4.0]])  # chosen f = 3, rejected f = 1 - 2 = -1
    mask = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    s = guidance_stats(g, mask, alpha=0.5)
    assert s["tgdpo/guidance_chosen"] == 4.0
    assert s["tgdpo/nonpositive_weight_frac"] == 0.5


GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
SCORES = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0])


def test_pairs_first_and_all():
    c, r = preference_pairs(SCORES, GROUPS, rule="first", max_pairs_per_group=1)
    # group 1 (all right) has no pair
    assert c.tolist() == [0, 7] and r.tolist() == [1, 6]
    c, r = preference_pairs(SCORES, GROUPS, rule="first", max_pairs_per_group=4)
    assert c.tolist() == [0, 2, 7] and r.tolist() == [1, 3, 6]
    c, r = preference_pairs(SCORES, GROUPS, rule="all")
    assert list(zip(c.tolist(), r.tolist())) == [(0, 1), (0, 3), (2, 1), (2, 3), (7, 6), (7, 8)]
    assert interleave_pairs(c[:2], r[:2]).tolist() == [0, 1, 0, 3]


def test_pairs_random_draws_correct_against_incorrect():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        c, r = preference_pairs(SCORES, GROUPS, rule="random", max_pairs_per_group=2, generator=gen)
        assert len(c) == 3
        assert all(SCORES[i] == 1.0 for i in c) and all(SCORES[i] == 0.0 for i in r)
        assert all(GROUPS[i] == GROUPS[j] for i, j in zip(c, r))


def test_pairs_continuous_scores_take_best_against_worst_and_min_gap():
    scores = torch.tensor([0.2, 0.9, 0.5, 0.50, 0.52])
    groups = torch.tensor([0, 0, 0, 1, 1])
    c, r = preference_pairs(scores, groups, rule="first")
    assert c.tolist() == [1, 4] and r.tolist() == [0, 3]
    c, r = preference_pairs(scores, groups, rule="first", min_gap=0.1)
    assert c.tolist() == [1] and r.tolist() == [0]
    with pytest.raises(ValueError, match="pair_rule"):
        preference_pairs(scores, groups, rule="best")
    empty_c, empty_r = preference_pairs(torch.ones(4), torch.tensor([0, 0, 1, 1]))
    assert empty_c.numel() == 0 and empty_r.numel() == 0


def test_spread_step_rewards():
    # one row: prompt columns 0-1, response columns 2-7; steps end at columns 3 and 6; column 7 trails
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    values = torch.tensor([[0.8, 0.3]])
    out = spread_step_rewards(values, torch.ones(1, 2), torch.tensor([[3, 6]]), torch.tensor([0.5]), mask)
    expected = torch.tensor([[0, 0, 0.3, 0.3, -0.5, -0.5, -0.5, 0]])
    torch.testing.assert_close(out, expected)
