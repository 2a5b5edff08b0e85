"""Advantage estimators against Python-loop references, hand-worked values, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlloop.algos import ADVANTAGES, compute_advantages, make_group_ids

from . import reference as ref
from .strategies import ragged_batches

torch.set_num_threads(1)
SETTINGS = settings(max_examples=25, deadline=None)
EPS = 1e-6


def run(name, batch, **kw):
    adv, ret = compute_advantages(
        name, batch.t(batch.rewards), batch.t(batch.mask), torch.tensor(batch.gids), eps=EPS, **kw
    )
    return adv, ret


def close(x: torch.Tensor, expected, atol=1e-9):
    torch.testing.assert_close(x, torch.tensor(expected, dtype=x.dtype), atol=atol, rtol=1e-7)


def zero_outside_mask(batch, *tensors):
    m = batch.t(batch.mask)
    for x in tensors:
        assert torch.all(x[m == 0] == 0)


def test_registry_has_every_estimator_of_the_issue():
    assert {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gdpo"} <= set(
        ADVANTAGES
    )


@SETTINGS
@given(ragged_batches())
def test_grpo_matches_reference(batch):
    adv, ret = run("grpo", batch)
    close(adv, ref.grpo(batch.rewards, batch.mask, batch.gids, EPS))
    assert torch.equal(adv, ret)
    zero_outside_mask(batch, adv)


@SETTINGS
@given(ragged_batches())
def test_dr_grpo_matches_reference(batch):
    adv, _ = run("dr_grpo", batch)
    close(adv, ref.dr_grpo(batch.rewards, batch.mask, batch.gids))


@SETTINGS
@given(ragged_batches())
def test_rloo_matches_reference(batch):
    adv, _ = run("rloo", batch)
    close(adv, ref.rloo(batch.rewards, batch.mask, batch.gids))


@SETTINGS
@given(ragged_batches(holes=True), st.sampled_from([1.0, 0.9, 0.5, 0.0]))
def test_reinforce_pp_matches_reference(batch, gamma):
    adv, ret = run("reinforce_pp", batch, gamma=gamma)
    exp_adv, exp_ret = ref.reinforce_pp(batch.rewards, batch.mask, batch.gids, gamma, EPS)
    close(ret, exp_ret)
    close(adv, exp_adv, atol=1e-7)
    zero_outside_mask(batch, adv, ret)


@SETTINGS
@given(ragged_batches())
def test_reinforce_pp_baseline_matches_reference(batch):
    adv, _ = run("reinforce_pp_baseline", batch)
    close(adv, ref.reinforce_pp_baseline(batch.rewards, batch.mask, batch.gids, EPS), atol=1e-7)


@SETTINGS
@given(ragged_batches(), st.integers(1, 3))
def test_gdpo_matches_reference(batch, num_sources):
    comps = [[float(batch.rng.random() < 0.5) for _ in range(num_sources)] for _ in range(batch.B)]
    weights = [batch.rng.uniform(0.1, 2.0) for _ in range(num_sources)]
    adv, _ = run("gdpo", batch, reward_components=batch.t(comps), reward_weights=weights)
    close(adv, ref.gdpo(comps, weights, batch.mask, batch.gids, EPS), atol=1e-7)


@SETTINGS
@given(
    ragged_batches(holes=True),
    st.sampled_from([1.0, 0.95, 0.5]),
    st.sampled_from([1.0, 0.95, 0.0]),
    st.booleans(),
)
def test_gae_matches_reference(batch, gamma, lam, whiten):
    adv, ret = run("gae", batch, values=batch.t(batch.values), gamma=gamma, lam=lam, whiten=whiten)
    exp_adv, exp_ret = ref.gae(batch.rewards, batch.values, batch.mask, gamma, lam, EPS, whiten)
    close(ret, exp_ret)
    close(adv, exp_adv, atol=1e-7)


@SETTINGS
@given(ragged_batches())
def test_all_equal_rewards_give_zero_group_advantage(batch):
    # Every row of a group gets the same score -> no group-relative signal.
    for b, row in enumerate(batch.mask):
        batch.rewards[b] = [0.0] * batch.T
        ts = [t for t, m in enumerate(row) if m]
        if ts:
            batch.rewards[b][ts[-1]] = 0.7
    # (rows with no response token are padding: they must not pull the group mean to 0)
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "gdpo"):
        adv, _ = run(name, batch)
        assert torch.allclose(adv, torch.zeros_like(adv), atol=0), name


# ------------------------------------------------------------ hand-worked
# Group {0,1,2} scores (1, 0, 0): mean 1/3, unbiased std sqrt(1/3); group {3}: one row.
HAND_MASK = [[0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 1, 1]]
HAND_REWARDS = [[0, 0, 1], [0, 0, 0], [0, 0, 0], [0, 0, 5]]
HAND_GIDS = [7, 7, 7, 3]


def hand(name, **kw):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return compute_advantages(name, t(HAND_REWARDS), t(HAND_MASK), torch.tensor(HAND_GIDS), eps=0.0, **kw)


def test_grpo_hand_worked():
    adv, _ = hand("grpo")
    a, b = (2 / 3) / math.sqrt(1 / 3), (-1 / 3) / math.sqrt(1 / 3)  # 1.1547, -0.57735
    close(adv, [[0, a, a], [b, b, 0], [0, 0, b], [0, 0, 0]])  # group of one -> 0


def test_dr_grpo_and_rloo_hand_worked():
    adv, _ = hand("dr_grpo")
    close(adv, [[0, 2 / 3, 2 / 3], [-1 / 3, -1 / 3, 0], [0, 0, -1 / 3], [0, 0, 0]])
    adv, _ = hand("rloo")  # 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5
    close(adv, [[0, 1, 1], [-0.5, -0.5, 0], [0, 0, -0.5], [0, 0, 0]])


def test_reinforce_pp_hand_worked():
    # rows: rewards (0, 0, 1) on 3 tokens and (1) on 1 token, gamma 0.5 -> returns 0.25, 0.5, 1 | 1
    # tokens 0.25, 0.5, 1, 1: mean 0.6875, unbiased std 0.375.
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    adv, ret = compute_advantages(
        "reinforce_pp",
        t([[0, 0, 1], [1, 0, 0]]),
        t([[1, 1, 1], [1, 0, 0]]),
        torch.tensor([0, 1]),
        gamma=0.5,
        eps=0.0,
    )
    close(ret, [[0.25, 0.5, 1.0], [1.0, 0, 0]])
    close(adv, [[-0.4375 / 0.375, -0.1875 / 0.375, 0.3125 / 0.375], [0.3125 / 0.375, 0, 0]])


def test_reinforce_pp_baseline_hand_worked():
    # one group: scores 1 (2 tokens) and 0 (1 token) -> 0.5, 0.5 | -0.5; tokens mean 1/6, std sqrt(1/3)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    adv, _ = compute_advantages(
        "reinforce_pp_baseline", t([[0, 1], [0, 0]]), t([[1, 1], [1, 0]]), torch.tensor([0, 0]), eps=0.0
    )
    s = math.sqrt(1 / 3)
    close(adv, [[(1 / 3) / s, (1 / 3) / s], [(-2 / 3) / s, 0]])


def test_gdpo_hand_worked_keeps_reward_combinations_apart():
    # groups {0,1}, {2,3}; source 1 = (1,0 | 1,1), source 2 = (0,1 | 1,0)
    # per-source group z: s1 -> (.7071, -.7071 | 0, 0), s2 -> (-.7071, .7071 | .7071, -.7071)
    # sum -> (0, 0, .7071, -.7071); batch z (std sqrt(1/3)) -> (0, 0, 1.2247, -1.2247)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    mask = t([[1], [1], [1], [1]])
    comps = t([[1, 0], [0, 1], [1, 1], [1, 0]])
    adv, _ = compute_advantages(
        "gdpo",
        torch.zeros(4, 1, dtype=torch.float64),
        mask,
        torch.tensor([0, 0, 1, 1]),
        eps=0.0,
        reward_components=comps,
    )
    close(adv, [[0], [0], [math.sqrt(1.5)], [-math.sqrt(1.5)]])


def test_gae_hand_worked():
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    args = (t([[0, 0, 0, 1]]), t([[0, 1, 1, 1]]), torch.tensor([0]))
    values = t([[9.0, 0.5, 0.6, 0.8]])  # position 0 is a prompt token: its value must be ignored
    # gamma = lam = 1: deltas 0.1, 0.2, 0.2 -> A = 0.5, 0.4, 0.2; returns = Monte Carlo = 1
    adv, ret = compute_advantages("gae", *args, values=values, whiten=False)
    close(adv, [[0, 0.5, 0.4, 0.2]])
    close(ret, [[0, 1, 1, 1]])
    # gamma 0.9, lam 0.5: deltas 0.04, 0.12, 0.2 -> A2 = 0.2, A1 = 0.12 + 0.45 * 0.2, A0 = 0.04 + 0.45 * A1
    adv, ret = compute_advantages("gae", *args, values=values, gamma=0.9, lam=0.5, whiten=False)
    close(adv, [[0, 0.1345, 0.21, 0.2]])
    close(ret, [[0, 0.6345, 0.81, 1.0]])


# ------------------------------------------------------------ bad input
def good():
    return torch.zeros(4, 3), torch.ones(4, 3), torch.tensor([0, 0, 1, 1])


def test_unknown_estimator_is_named():
    with pytest.raises(ValueError, match=r"algo\.advantage='grpoo'.*known: \['dr_grpo'"):
        compute_advantages("grpoo", *good())


def test_mismatched_shapes_are_named():
    r, m, g = good()
    with pytest.raises(ValueError, match=r"response_mask has shape \(4, 2\), expected \(4, 3\)"):
        compute_advantages("grpo", r, m[:, :2], g)
    with pytest.raises(ValueError, match=r"group_ids has shape \(3,\), expected \(4,\)"):
        compute_advantages("grpo", r, m, g[:3])
    with pytest.raises(ValueError, match=r"values has shape \(4, 1\)"):
        compute_advantages("gae", r, m, g, values=torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"token_rewards must have 2 dims, got shape \(4,\)"):
        compute_advantages("grpo", r[:, 0], m, g)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_are_named(bad):
    r, m, g = good()
    r[2, 1] = bad
    with pytest.raises(ValueError, match=r"token_rewards contains 1 non-finite value.*\(2, 1\)"):
        compute_advantages("grpo", r, m, g)


def test_group_size_that_does_not_divide_the_batch():
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the batch size 8"):
        make_group_ids(8, 3)
    r, m, _ = good()
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the batch size 4"):
        compute_advantages("grpo", r, m, torch.tensor([0, 0, 0, 1]), group_size=3)
    with pytest.raises(ValueError, match=r"group_size=2 but group_ids has groups of sizes \[1, 3\]"):
        compute_advantages("grpo", r, m, torch.tensor([0, 0, 0, 1]), group_size=2)
    assert make_group_ids(6, 3).tolist() == [0, 0, 0, 1, 1, 1]


def test_other_bad_arguments():
    r, m, g = good()
    with pytest.raises(ValueError, match="needs values"):
        compute_advantages("gae", r, m, g)
    with pytest.raises(TypeError, match=r"'grpo' does not take argument\(s\) \['whiten'\]"):
        compute_advantages("grpo", r, m, g, whiten=False)
    with pytest.raises(ValueError, match=r"response_mask must hold only 0/1, got 0.5"):
        compute_advantages("grpo", r, m * 0.5, g)
    with pytest.raises(ValueError, match=r"gamma must be in \[0.0, 1.0\], got 1.5"):
        compute_advantages("reinforce_pp", r, m, g, gamma=1.5)
    with pytest.raises(ValueError, match=r"reward_weights has shape \(3,\), expected \(2,\)"):
        compute_advantages("gdpo", r, m, g, reward_components=torch.zeros(4, 2), reward_weights=[1, 1, 1])
    with pytest.raises(ValueError, match=r"reward_components contains 1 non-finite"):
        compute_advantages("gdpo", r, m, g, reward_components=torch.tensor([[0.0], [1], [float("nan")], [0]]))
