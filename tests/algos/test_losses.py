"""Policy losses, aggregation, TIS, entropy, value loss and KL estimators against loop references;
the policy-gradient identity at ratio 1; bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlloop.algos import (
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    apply_kl_in_reward,
    compute_policy_loss,
    compute_value_loss,
    entropy_from_logits,
    kl_loss,
    kl_penalty,
    logprobs_from_logits,
    make_kl_controller,
)

from . import reference as ref
from .strategies import ragged_batches

torch.set_num_threads(1)
SETTINGS = settings(max_examples=25, deadline=None)
T64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=T64)


def close(x, expected, atol=1e-9):
    torch.testing.assert_close(
        torch.as_tensor(x, dtype=T64), torch.as_tensor(expected, dtype=T64), atol=atol, rtol=1e-7
    )


def noisy(batch, scale):
    return [[batch.rng.gauss(0, scale) for _ in range(batch.T)] for _ in range(batch.B)]


# ------------------------------------------------------------ aggregation
@SETTINGS
@given(ragged_batches(), st.sampled_from(LOSS_AGG_MODES))
def test_aggregate_matches_reference(batch, mode):
    loss = noisy(batch, 1.0)
    close(aggregate_loss(t(loss), t(batch.mask), mode), ref.aggregate(loss, batch.mask, mode))


def test_aggregate_hand_worked():
    loss, mask = t([[1, 2, 3], [4, 9, 9], [7, 7, 7]]), t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    close(aggregate_loss(loss, mask, "token-mean"), 10 / 4)
    close(aggregate_loss(loss, mask, "seq-mean-token-sum"), (6 + 4) / 2)  # the empty row is not a sequence
    close(aggregate_loss(loss, mask, "seq-mean-token-mean"), (2 + 4) / 2)
    close(aggregate_loss(loss, mask, "seq-mean-token-sum-norm"), 10 / (3 * 3))
    close(aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm_len=5), 10 / (3 * 5))
    empty = aggregate_loss(loss.clone().requires_grad_(), torch.zeros(3, 3), "seq-mean-token-mean")
    assert float(empty.detach()) == 0.0 and empty.requires_grad


# ------------------------------------------------------------ policy losses
@SETTINGS
@given(
    ragged_batches(),
    st.sampled_from(sorted(POLICY_LOSSES)),
    st.sampled_from(LOSS_AGG_MODES),
    st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)]),
    st.booleans(),
)
def test_policy_loss_matches_reference(batch, name, mode, clips, tis):
    lo, hi, c = *clips, 3.0
    lp = noisy(batch, 0.3)
    old = [[x + batch.rng.gauss(0, 0.3) for x in r] for r in lp]
    adv = noisy(batch, 1.0)
    rollout = [[x + batch.rng.gauss(0, 0.3) for x in r] for r in old]
    cap = 1.5
    loss, metrics = compute_policy_loss(
        name, t(lp), t(old), t(adv), t(batch.mask), loss_agg=mode, clip_low=lo, clip_high=hi, clip_ratio_c=c,
        rollout_logprobs=t(rollout) if tis else None, tis_cap=cap if tis else None,
    )  # fmt: skip
    mat = ref.policy_loss_matrix(name, lp, old, adv, batch.mask, lo, hi, c)
    if tis:
        mat = [
            [v * min(math.exp(old[b][i] - rollout[b][i]), cap) for i, v in enumerate(r)]
            for b, r in enumerate(mat)
        ]
    close(loss, ref.aggregate(mat, batch.mask, mode))
    n = sum(map(sum, batch.mask))
    kl = sum(old[b][i] - lp[b][i] for b, r in enumerate(batch.mask) for i, m in enumerate(r) if m) / max(n, 1)
    assert metrics["ppo_kl"] == pytest.approx(kl, abs=1e-9)
    assert 0.0 <= metrics["pg_clipfrac"] <= 1.0


def test_ppo_clip_hand_worked():
    # token 0: ratio 1.5, A = +1 -> max(-1.5, -1.2) = -1.2; token 1: ratio 0.5, A = -1 -> max(0.5, 0.8) = 0.8
    lp, old, adv, mask = t([[math.log(1.5), math.log(0.5)]]), t([[0.0, 0.0]]), t([[1.0, -1.0]]), t([[1, 1]])
    loss, m = compute_policy_loss("ppo", lp, old, adv, mask)
    close(loss, (-1.2 + 0.8) / 2)
    assert m["pg_clipfrac"] == 1.0
    # clip-higher: eps_high 0.28 lets token 0 reach -1.28
    loss, _ = compute_policy_loss("clip_higher", lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    close(loss, (-1.28 + 0.8) / 2)


def test_dual_clip_hand_worked():
    # A = -1, ratio 5: PPO gives max(5, 1.2) = 5; dual clip caps it at -A * c = 3
    lp, old, adv, mask = t([[math.log(5.0), 0.0]]), t([[0.0, 0.0]]), t([[-1.0, 2.0]]), t([[1, 1]])
    ppo, _ = compute_policy_loss("ppo", lp, old, adv, mask, loss_agg="seq-mean-token-sum")
    dual, m = compute_policy_loss(
        "dual_clip", lp, old, adv, mask, loss_agg="seq-mean-token-sum", clip_ratio_c=3.0
    )
    close(ppo, 5.0 - 2.0)
    close(dual, 3.0 - 2.0)
    assert m["pg_clipfrac_lower"] == 0.5


def test_gspo_hand_worked():
    # log-ratios (log 2, 0) -> sequence ratio exp(log 2 / 2) = sqrt 2 -> clipped to 1.2 for A = 1
    lp, old, adv, mask = (
        t([[math.log(2.0), 0.0, 5.0]]),
        t([[0.0, 0.0, 0.0]]),
        t([[1.0, 1.0, 1.0]]),
        t([[1, 1, 0]]),
    )
    loss, m = compute_policy_loss("gspo", lp, old, adv, mask, loss_agg="seq-mean-token-mean")
    close(loss, -1.2)
    assert m["pg_clipfrac"] == 1.0


def test_tis_hand_worked():
    # old - rollout = log 3 -> weight min(3, 2) = 2; ratio 1, A = 1 -> loss -1 * 2
    lp = t([[0.0]])
    loss, m = compute_policy_loss(
        "ppo", lp, lp, t([[1.0]]), t([[1]]), rollout_logprobs=t([[-math.log(3.0)]]), tis_cap=2.0
    )
    close(loss, -2.0)
    assert m["tis_clipfrac"] == 1.0 and m["tis_weight_mean"] == pytest.approx(2.0)
    assert m["rollout_kl"] == pytest.approx(-math.log(3.0))


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_gradient_at_ratio_one_is_the_policy_gradient(name, mode):
    """At pi = pi_old every loss's gradient is the REINFORCE estimator -agg(A * grad log pi)."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 5, 6
    theta = torch.randn(B, T, V, generator=g, dtype=T64, requires_grad=True)  # a toy tabular policy
    actions = torch.randint(V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.7).to(T64)
    mask[3] = 0  # an all-masked row
    adv = torch.randn(B, T, generator=g, dtype=T64)
    if name == "gspo":  # GSPO's advantage is per sequence
        adv = adv[:, :1].expand(B, T).contiguous()
    lp = logprobs_from_logits(theta, actions)
    loss, _ = compute_policy_loss(
        name, lp, lp.detach(), adv, mask, loss_agg=mode, clip_low=0.2, clip_high=0.28
    )
    (grad,) = torch.autograd.grad(loss, theta)

    # REINFORCE estimator: d/dtheta[b,t,v] log pi(a_bt) = 1[v = a_bt] - pi_v, weighted by the aggregation's
    # per-token coefficient (its derivative with respect to the loss matrix), written out by hand.
    p = torch.softmax(theta.detach(), -1)
    score = torch.nn.functional.one_hot(actions, V).to(T64) - p
    tokens, live = mask.sum(-1), (mask.sum(-1) > 0).to(T64)
    coef = {
        "token-mean": mask / mask.sum(),
        "seq-mean-token-sum": mask / live.sum(),
        "seq-mean-token-mean": mask / tokens.clamp(min=1)[:, None] / live.sum(),
        "seq-mean-token-sum-norm": mask / (B * T),
    }[mode]
    expected = -(coef * adv)[..., None] * score
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-9)


def test_clipped_tokens_get_no_gradient():
    lp = t([[math.log(1.5), math.log(1.1)]]).requires_grad_()
    loss, _ = compute_policy_loss("ppo", lp, t([[0.0, 0.0]]), t([[1.0, 1.0]]), t([[1, 1]]))
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad[0, 0] == 0 and grad[0, 1] == pytest.approx(-1.1 / 2)


# ------------------------------------------------------------ KL
@SETTINGS
@given(ragged_batches(), st.sampled_from(["k1", "k2", "k3", "abs"]), st.sampled_from([0.1, 1.0, 30.0]))
def test_kl_estimators_match_reference(batch, name, scale):
    lp, rf = noisy(batch, scale), noisy(batch, scale)
    out = kl_penalty(name, t(lp), t(rf))
    close(
        out,
        [[ref.kl(name, a, b) for a, b in zip(r1, r2, strict=True)] for r1, r2 in zip(lp, rf, strict=True)],
    )


def test_kl_hand_worked():
    lp, rf = t([[math.log(2.0)]]), t([[0.0]])
    close(kl_penalty("k1", lp, rf), [[math.log(2)]])
    close(kl_penalty("k2", lp, rf), [[0.5 * math.log(2) ** 2]])
    close(kl_penalty("k3", lp, rf), [[0.5 + math.log(2) - 1]])  # exp(-x) + x - 1
    close(kl_penalty("abs", -lp, rf), [[math.log(2)]])


def test_k1_and_k3_are_unbiased_kl_estimators():
    # Sampling y ~ pi over a 3-token vocabulary: E[k1] = E[k3] = KL(pi || ref); E[k2] is only close.
    p, q = torch.tensor([0.6, 0.3, 0.1], dtype=T64), torch.tensor([0.2, 0.5, 0.3], dtype=T64)
    exact = float((p * (p / q).log()).sum())
    ks = {name: float((p * kl_penalty(name, p.log()[None], q.log()[None])[0]).sum()) for name in ("k1", "k3")}
    assert ks["k1"] == pytest.approx(exact) and ks["k3"] == pytest.approx(exact)


@SETTINGS
@given(ragged_batches(), st.sampled_from(["k1", "k2", "k3"]), st.sampled_from(LOSS_AGG_MODES))
def test_kl_in_loss_and_in_reward(batch, name, mode):
    lp, rf = noisy(batch, 0.5), noisy(batch, 0.5)
    kl = [[ref.kl(name, a, b) for a, b in zip(r1, r2, strict=True)] for r1, r2 in zip(lp, rf, strict=True)]
    close(
        kl_loss(t(lp), t(rf), t(batch.mask), estimator=name, loss_agg=mode),
        ref.aggregate(kl, batch.mask, mode),
    )
    rewards, current = apply_kl_in_reward(
        t(batch.rewards), t(lp), t(rf), t(batch.mask), kl_coef=0.1, estimator=name
    )
    expected = [
        [r - 0.1 * k * m for r, k, m in zip(rr, kk, mm, strict=True)]
        for rr, kk, mm in zip(batch.rewards, kl, batch.mask, strict=True)
    ]
    close(rewards, expected)
    live = [b for b, r in enumerate(batch.mask) if any(r)]
    rows = [sum(k * m for k, m in zip(kl[b], batch.mask[b], strict=True)) / sum(batch.mask[b]) for b in live]
    assert current == pytest.approx(sum(rows) / len(rows) if rows else 0.0)


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(10.0, 64)
    assert fixed.value == 0.05
    ctl = AdaptiveKLController(0.1, target_kl=0.02, horizon=1000)
    ctl.update(0.04, n_steps=100)  # KL twice the target: error clipped to +0.2 -> x (1 + 0.2 * 0.1)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(0.015, n_steps=100)  # error -0.25 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    assert isinstance(make_kl_controller(0.1), FixedKLController)
    assert isinstance(make_kl_controller(0.1, target_kl=0.01), AdaptiveKLController)


# ------------------------------------------------------------ entropy, value loss
@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_entropy_matches_reference(B, T, V, seed):
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed), dtype=T64) * 5
    out = entropy_from_logits(logits)
    close(out, [[ref.entropy(logits[b, i].tolist()) for i in range(T)] for b in range(B)])


def test_entropy_hand_worked():
    close(entropy_from_logits(torch.zeros(1, 1, 4, dtype=T64)), [[math.log(4)]])
    close(entropy_from_logits(t([[[0.0, -1e4]]])), [[0.0]], atol=1e-6)


@SETTINGS
@given(ragged_batches(), st.sampled_from(LOSS_AGG_MODES), st.sampled_from([0.1, 0.5]))
def test_value_loss_matches_reference(batch, mode, clip):
    v, old, ret = noisy(batch, 1.0), noisy(batch, 1.0), noisy(batch, 1.0)
    loss, m = compute_value_loss(t(v), t(old), t(ret), t(batch.mask), clip=clip, loss_agg=mode)
    mat = [
        [max((v[b][i] - ret[b][i]) ** 2, (old[b][i] + ref.clip(v[b][i] - old[b][i], -clip, clip) - ret[b][i]) ** 2)
         for i in range(batch.T)]
        for b in range(batch.B)
    ]  # fmt: skip
    close(loss, 0.5 * ref.aggregate(mat, batch.mask, mode))
    assert 0 <= m["vf_clipfrac"] <= 1


def test_value_loss_hand_worked():
    # V = 1, old 0.5, R = 2, clip 0.2: V_clip = 0.7; max((1-2)^2, (0.7-2)^2) = 1.69 -> 0.845
    loss, m = compute_value_loss(t([[1.0]]), t([[0.5]]), t([[2.0]]), t([[1]]), clip=0.2)
    close(loss, 0.845)
    assert m["vf_clipfrac"] == 1.0


# ------------------------------------------------------------ bad input
def test_bad_input_is_named():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"algo\.policy_loss='ppo2'"):
        compute_policy_loss("ppo2", x, x, x, m)
    with pytest.raises(ValueError, match=r"algo\.loss_agg='mean'.*expected one of \['token-mean'"):
        compute_policy_loss("ppo", x, x, x, m, loss_agg="mean")
    with pytest.raises(ValueError, match=r"algo\.loss_agg='sum'"):
        aggregate_loss(x, m, "sum")
    with pytest.raises(
        ValueError, match=r"advantages has shape \(2, 2\), expected \(2, 3\) \(the shape of logprobs\)"
    ):
        compute_policy_loss("ppo", x, x, x[:, :2], m)
    with pytest.raises(ValueError, match=r"old_logprobs contains 1 non-finite value.*\(1, 2\): nan"):
        compute_policy_loss("ppo", x, torch.tensor([[0.0, 0, 0], [0, 0, float("nan")]]), x, m)
    with pytest.raises(ValueError, match=r"tis_cap=2.0 needs rollout_logprobs"):
        compute_policy_loss("ppo", x, x, x, m, tis_cap=2.0)
    with pytest.raises(ValueError, match=r"clip_ratio_c > 1, got clip_ratio_c=0.5"):
        compute_policy_loss("dual_clip", x, x, x, m, clip_ratio_c=0.5)
    with pytest.raises(ValueError, match=r"clip_high >= clip_low"):
        compute_policy_loss("clip_higher", x, x, x, m, clip_low=0.3, clip_high=0.2)
    with pytest.raises(ValueError, match=r"algo\.kl_estimator='k4'"):
        kl_penalty("k4", x, x)
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(2, 2\)"):
        kl_penalty("k1", x, x[:, :2])
    with pytest.raises(ValueError, match=r"ref_logprobs contains 1 non-finite value.*inf"):
        kl_penalty("k3", x, torch.tensor([[0.0, float("inf"), 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"returns has shape \(2, 1\)"):
        compute_value_loss(x, x, x[:, :1], m)
    with pytest.raises(ValueError, match=r"logits must have 3 dims, got shape \(2, 3\)"):
        entropy_from_logits(x)
